"""Never lose a file the user made: decide whether an existing output may be replaced.

An output (features file, head folder) made with other settings is replaced only when

  * the user asked for it (``--force``), or
  * a DVC stage (``DVC_STAGE`` is set) replaces its own output and the old version's exact
    bytes are in the project's DVC cache (``dvc checkout`` or ``dvc exp apply`` brings it
    back).  A hand-run command never relies on that: a copy of a pipeline file has its bytes
    in the cache too, yet nothing would restore it at its own path.

Otherwise the command refuses in one line that names ``--force`` and ``--out``.  Outputs are
always written under a temporary name and renamed into place, so a failed or interrupted run
(DVC's included: the stages' outputs are ``persist``-ed, so DVC does not delete them first)
leaves the previous file as it was.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from pipeline.core.errors import UsageError

log = logging.getLogger(__name__)


class OutputExists(UsageError):
    """An output made from other settings exists and would be replaced (exit code 2)."""


def _dvc_root(path: Path) -> Path | None:
    """The nearest folder above ``path`` holding a ``.dvc`` folder (a DVC project), or None."""
    for folder in [path.resolve().parent, *path.resolve().parents]:
        if (folder / ".dvc").is_dir():
            return folder
    return None


def _dvc_cache_dir(root: Path) -> Path:
    """The project's DVC cache folder (``.dvc/cache`` unless ``[cache] dir`` says otherwise)."""
    cache = root / ".dvc" / "cache"
    for name in ("config", "config.local"):
        cfg = configparser.ConfigParser()
        try:
            cfg.read(root / ".dvc" / name)
        except configparser.Error:
            continue
        for section in ("cache", "'cache'"):
            if cfg.has_option(section, "dir"):
                cache = (root / ".dvc" / cfg.get(section, "dir")).resolve()
    return cache


_md5_memo: dict[tuple[str, int, int], str] = {}


def file_md5(path: Path) -> str:
    """md5 of a file's bytes (DVC's content address), memoised by path, size and mtime."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _md5_memo:
        digest = hashlib.md5()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _md5_memo[key] = digest.hexdigest()
    return _md5_memo[key]


def in_dvc_cache(path: str | Path) -> bool:
    """True when every file at ``path`` (a file, or a folder's files) has its exact bytes in the
    DVC cache of the project ``path`` belongs to, so DVC can restore it."""
    path = Path(path)
    root = _dvc_root(path)
    if root is None or not path.exists():
        return False
    cache = _dvc_cache_dir(root)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    if not files:
        return False
    for f in files:
        md5 = file_md5(f)
        if not any((c / md5[:2] / md5[2:]).is_file() for c in (cache / "files" / "md5", cache)):
            return False
    return True


def check_replace(path: Path, what: str, differences: list[str], force: bool) -> None:
    """Allow replacing ``path`` (made from other settings: ``differences``) or raise ``OutputExists``."""
    if force:
        log.warning("replacing %s (--force): %s", path, "; ".join(differences))
        return
    stage = os.environ.get("DVC_STAGE")
    if stage and in_dvc_cache(path):
        log.info("replacing %s; the previous version is in the DVC cache (dvc checkout restores it)", path)
        return
    fix = (f"it is not in DVC's cache, so DVC stage {stage} will not replace it: move it away "
           f"(it is yours), then run again" if stage else "pass --force to replace it, or --out to write elsewhere")
    if len(differences) == 1 and differences[0].startswith("it is not a tlpipe"):
        raise OutputExists(f"{path} was not made by tlpipe ({differences[0]}); not replacing it: {fix}")
    raise OutputExists(f"{path} holds {what} made from other settings ({'; '.join(differences)}); "
                       f"not replacing it: {fix}")


def check_out_path(path: Path, kind: str, option: str = "--out") -> None:
    """Refuse, in one line (exit 2), an output path that cannot be written, before any work: ``kind`` is
    ``"file"`` or ``"folder"``; a folder where a file goes (or the reverse), a parent that is a file, or
    a folder where the output's temporary sibling cannot be created (see ``check_writable``)."""
    path = Path(path)
    label = f"{option} {path}" if option else str(path)
    if kind == "file" and path.is_dir():
        raise UsageError(f"{label} is a folder; give a file path")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise UsageError(f"{label} is a file; give a folder path (this command writes a folder)")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{label}: {parent} is a file, not a folder")
            break
    check_writable(path, option)


def check_writable(path: Path, option: str = "--out") -> None:
    """Refuse (exit 2) an output whose folder this process cannot write in: outputs are written to a
    temporary sibling and renamed, so the nearest existing folder above ``path`` must take a new file
    (tried for real with a probe file: permissions, read-only mounts, immutable folders, quotas)."""
    import errno
    import tempfile

    path = Path(path)
    folder = next((p for p in path.absolute().parents if p.exists()), None)
    if folder is None or not folder.is_dir():
        return  # check_out_path names a parent that is a file
    try:
        fd, probe = tempfile.mkstemp(prefix=".tlpipe-write-check.", dir=folder)
    except OSError as exc:
        why = "permission denied" if exc.errno in (errno.EACCES, errno.EPERM) else (exc.strerror or str(exc))
        where = "" if folder == path.absolute().parent else f" (it would be created in {folder})"
        label, fix = (f"{option} {path}", f"choose another {option}") if option else (str(path), "make it writable")
        raise UsageError(f"{label} cannot be written: {folder} is not writable ({why}){where}; {fix}") from None
    os.close(fd)
    os.unlink(probe)


def guard_user_file(path: Path, what: str, ours, force: bool, option: str = "--out") -> None:
    """Refuse to replace an existing file ``path`` that ``ours(path)`` does not recognise as ``what``
    written by tlpipe (a file the user made), unless ``force``; refuse an unwritable one (``check_out_path``)."""
    path = Path(path)
    check_out_path(path, "file", option)
    if force or not path.exists():
        return
    try:
        recognised = bool(ours(path))
    except (OSError, ValueError, UnicodeDecodeError):
        recognised = False
    if not recognised:
        raise OutputExists(f"{path} exists and is not {what} written by tlpipe; not replacing it: "
                           "pass --force to replace it, or --out to write elsewhere")


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out``; the old ``out`` is removed only afterwards."""
    old = out.with_name(f".{out.name}.old")
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)  # put the previous one back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _names(paths) -> str:
    return ", ".join(Path(str(p)).name for p in paths) or "none"


def _features_change(old: dict, new: dict) -> list[str]:
    """The features part of ``_head_changes``: other files (fingerprints), or the same ones in another order."""
    before, after = list(old.get("fingerprints") or []), list(new.get("fingerprints") or [])
    if before == after:
        return []
    names = (f"{_names(old['features'])} -> {_names(new['features'])}"
             if old.get("features") and new.get("features") else "")
    if sorted(before) == sorted(after):
        return [f"the same features files in another order{': ' + names if names else ''}"]
    return [f"fitted on other features ({names + ': ' if names else ''}other files, or extracted again with "
            "other base, weights, data or settings)"]


def _layers(value) -> str:
    """``--layers`` in a comparable form: ``all``, or the names sorted (the head uses them in stored order)."""
    text = str(value or "all").strip()
    if text.lower() in ("all", ""):
        return "all"
    return ",".join(sorted({n.strip() for n in text.split(",") if n.strip()}))


def _stream_change(before: dict, after: dict) -> list[str]:
    """Streamed from disk or in memory (another solver and tuning), and the streamed chunk size."""
    old_x, new_x = before.get("extra") or {}, after.get("extra") or {}
    old_s, new_s = bool(old_x.get("stream")), bool(new_x.get("stream"))
    if old_s != new_s:
        return [f"stream {'on' if old_s else 'off'} -> {'on' if new_s else 'off'} (fitted "
                f"{'from disk' if old_s else 'in memory'} before)"]
    if old_s and old_x.get("chunk_rows") != new_x.get("chunk_rows"):
        return [f"chunk_rows {old_x.get('chunk_rows')} -> {new_x.get('chunk_rows')}"]
    return []


def _head_changes(old: dict, new: dict) -> list[str]:
    """What differs between a head folder's ``head.json`` (``old``) and a new fit (``new``): the head,
    its features (files and their order), ``--layers``, the parameters, streaming."""
    changes = []
    if old.get("head") != new["head"]:
        changes.append(f"head {old.get('head')} -> {new['head']}")
    changes += _features_change(old, new)
    if _layers(old.get("layers")) != _layers(new.get("layers")):
        changes.append(f"layers {_layers(old.get('layers'))} -> {_layers(new.get('layers'))}")
    before, after = old.get("params") or {}, new.get("params") or {}
    changed = sorted(k for k in set(before) | set(after)
                     if k != "extra" and json.dumps(before.get(k)) != json.dumps(after.get(k)))
    if changed:
        def show(v):
            return "none" if v is None else v

        changes.append(", ".join(f"{k} {show(before.get(k))} -> {show(after.get(k))}" for k in changed))
    return changes + _stream_change(before, after)


def guard_head_folder(out: Path, new: dict, force: bool) -> None:
    """Refuse to replace a head folder fitted from other features, head, layers or parameters.

    ``new`` holds what the new head's ``model/head.json`` will record (``head``, ``features``,
    ``fingerprints``, ``params`` with streaming in ``params["extra"]``, ``layers`` unless all); any
    difference is named in the one-line refusal (``_head_changes``).  A folder whose ``model/`` DVC can
    restore may be replaced.
    """
    check_out_path(out, "folder")
    if not out.exists() or not any(out.iterdir()):
        return
    meta = out / "model" / "head.json"
    try:
        old = json.loads(meta.read_text())
    except (OSError, ValueError):
        old = None
    if old is None:
        changes = ["it is not a tlpipe head folder (no model/head.json)"]
    else:
        changes = _head_changes(old, new)
        if not changes:
            return  # same head, features, layers and parameters: fitting again is a refresh
    if not force and os.environ.get("DVC_STAGE") and (out / "model").is_dir() and in_dvc_cache(out / "model"):
        log.info("replacing %s; its model is in the DVC cache (dvc checkout restores it)", out)
        return
    check_replace(out, "a fitted head", changes, force)
