"""Nothing a user made is lost: hand-run commands refuse to replace outputs made otherwise, and a
failed or interrupted ``dvc repro`` / ``dvc exp run`` leaves every features file and head intact."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import dvc_env, make_dvc_project, make_folder, run_dvc
from pipeline.cli import cli

REPO = Path(__file__).resolve().parents[1]
TINY = ["--weights", "none", "--input-size", "32", "--batch-size", "8", "--no-progress"]


def _run(args, cwd=None):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (features files and head folders)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def test_hand_run_extract_never_replaces_a_file_made_otherwise(tmp_path):
    data = make_folder(tmp_path / "data", per_class=8)
    out = tmp_path / "cache" / "features" / "mobilenet_0.25.h5"
    first = _run(["extract", "--base", "mobilenet_0.25", "--data", str(data), "--cache-dir",
                  str(tmp_path / "cache"), *TINY])
    assert first.exit_code == 0, first.output
    made = out.read_bytes()

    # the case: a --weights none --limit run on top of a real-weights file
    again = _run(["extract", "--base", "mobilenet_0.25", "--data", str(data), "--cache-dir",
                  str(tmp_path / "cache"), *TINY, "--limit", "4"])
    assert again.exit_code == 2
    lines = [line for line in again.output.strip().splitlines() if "split of" not in line]  # small-split warnings
    assert len(lines) == 1 and lines[0].startswith("tlpipe: error: ") and "limit 0 -> 4" in lines[0] and "--force" in lines[0] and "--out" in lines[0]
    assert out.read_bytes() == made
    assert not list(out.parent.glob(".*partial*"))

    # the same settings again: up to date, nothing touched
    same = _run(["extract", "--base", "mobilenet_0.25", "--data", str(data), "--cache-dir",
                 str(tmp_path / "cache"), *TINY])
    assert same.exit_code == 0 and out.read_bytes() == made

    forced = _run(["extract", "--base", "mobilenet_0.25", "--data", str(data), "--cache-dir",
                   str(tmp_path / "cache"), *TINY, "--limit", "4", "--force"])
    assert forced.exit_code == 0, forced.output
    assert out.read_bytes() != made

    # a file that is not a features file at all is never overwritten
    precious = tmp_path / "notes.h5"
    precious.write_text("my own notes")
    other = _run(["extract", "--base", "mobilenet_0.25", "--data", str(data), "--out", str(precious), *TINY])
    assert other.exit_code == 2 and "not a tlpipe features file" in other.output
    assert precious.read_text() == "my own notes"


def test_hand_run_fit_head_never_replaces_a_head_fitted_otherwise(tmp_path):
    data = make_folder(tmp_path / "data", per_class=8)
    cache = tmp_path / "cache"
    assert _run(["extract", "--base", "mobilenet_0.25", "--data", str(data), "--cache-dir", str(cache),
                 *TINY]).exit_code == 0
    head = cache / "heads" / "mobilenet_0.25-dense"
    fit = ["fit-head", "--features", "mobilenet_0.25", "--head", "dense", "--cache-dir", str(cache),
           "--epochs", "2"]
    assert _run(fit).exit_code == 0
    before = _digest(head)
    refused = _run([*fit, "--hidden", "16"])
    assert refused.exit_code == 2
    assert "hidden 256 -> 16" in refused.output and "--force" in refused.output
    assert _digest(head) == before
    assert _run(fit).exit_code == 0  # same features and parameters: a refit is allowed
    assert _run([*fit, "--hidden", "16", "--force"]).exit_code == 0
    assert not list(head.parent.glob(".*"))  # no temporary or old folders left behind

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("do not delete")
    other = _run([*fit, "--out", str(mine)])
    assert other.exit_code == 2 and "not a tlpipe head folder" in other.output
    assert (mine / "thesis.txt").read_text() == "do not delete"


def test_a_refit_keeps_the_files_the_user_added_to_the_head_folder(tmp_path):
    """fit-head into its own folder again (same settings): notes.txt and figures/mine.png survive, said in
    one log line; tlpipe's own files are replaced, not duplicated."""
    data = make_folder(tmp_path / "data", per_class=6)
    feats = tmp_path / "f.h5"
    assert _run(["extract", "--base", "mobilenet_0.25", "--data", str(data), "--out", str(feats),
                 *TINY]).exit_code == 0
    head = tmp_path / "h"
    fit = ["fit-head", "--features", str(feats), "--out", str(head)]
    assert _run(fit).exit_code == 0
    (head / "notes.txt").write_text("my notes")
    (head / "figures" / "mine.png").write_bytes(b"my figure")
    (head / "figures" / "confusion.png").write_bytes(b"old")  # tlpipe's: drawn again
    r = _run(fit)
    assert r.exit_code == 0, r.output
    assert (head / "notes.txt").read_text() == "my notes"
    assert (head / "figures" / "mine.png").read_bytes() == b"my figure"
    assert (head / "figures" / "confusion.png").read_bytes() != b"old"
    kept = [line for line in r.output.splitlines() if "kept 2 file(s) you added to" in line]
    assert len(kept) == 1 and kept[0].endswith("figures/mine.png, notes.txt"), r.output
    assert not list(tmp_path.glob(".h*"))  # no temporary or old folder left


def test_publish_carries_only_the_users_files(tmp_path):
    """The one head-folder writer (fit-head, fine-tune, baseline): model/, .checkpoint/ and tlpipe's own
    names are not carried over; anything else is, and the new folder's files win."""
    from pipeline.heads.folder import publish, temp_folder

    out = tmp_path / "head"
    for rel, text in (("model/weights.npz", "old model"), (".checkpoint/state.json", "{}"),
                      ("metrics.json", "{}"), ("figures/grid.png", "old"), ("notes.txt", "mine"),
                      ("sub/deep/data.csv", "mine too")):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    tmp = temp_folder(out)
    (tmp / "model").mkdir()
    (tmp / "model" / "head.json").write_text("{}")
    (tmp / "metrics.json").write_text('{"new": 1}')
    publish(tmp, out)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["metrics.json", "model/head.json", "notes.txt", "sub/deep/data.csv"]
    assert (out / "metrics.json").read_text() == '{"new": 1}' and (out / "notes.txt").read_text() == "mine"
    assert not tmp.exists() and not list(tmp_path.glob(".head*"))


# ----------------------------------------------------------------------------- DVC


def _dvc(*args, cwd):
    return run_dvc(*args, cwd=cwd, timeout=600)


def _tlpipe(*args) -> int:
    """A hand-run tlpipe command in this process (CliRunner; the test chdirs into the project): what is
    tested is what DVC does to its outputs, not tlpipe's process; returns the exit code."""
    r = CliRunner().invoke(cli, list(args))
    assert r.exit_code == 0, r.output
    return r.exit_code


@pytest.fixture
def project(tmp_path):
    """A git + DVC project with the real dvc.yaml, one base (vgg16, random weights) and one head."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    data = make_folder(tmp_path / "images", per_class=12, size=(64, 48))
    work = tmp_path / "proj"
    params = make_dvc_project(work, data, "vgg16", epochs=3, patience=2)
    subprocess.run(["git", "add", "-A"], cwd=work, check=True)
    subprocess.run(["git", "commit", "-qm", "init"], cwd=work, check=True)
    return work, data, params


def _snapshot(work: Path) -> dict[str, str]:
    return {k: v for k, v in _digest(work / "cache").items() if not k.startswith("dvc/manifest")}


@pytest.mark.slow
def test_failed_or_interrupted_dvc_runs_keep_every_features_file_and_head(project, monkeypatch):
    work, data, params = project
    monkeypatch.chdir(work)  # the hand-run commands write to the CLI's default paths in the project
    # made by hand with the CLI's default paths, with other settings than params.yaml (input size 40)
    assert _tlpipe("extract", "--base", "vgg16", "--data", str(data), "--weights", "none", "--input-size", "40",
                   "--no-progress") == 0
    for head in ("logistic", "dense"):
        assert _tlpipe("fit-head", "--features", "vgg16", "--head", head, "--epochs", "2") == 0
    hand = _snapshot(work)

    first = _dvc("repro", cwd=work)  # the pipeline owns cache/dvc/: nothing of the user's is touched
    assert first.returncode == 0, first.stdout + first.stderr
    assert (work / "cache/dvc/features/vgg16.h5").is_file() and (work / "cache/dvc/heads/vgg16-logistic").is_dir()
    subprocess.run(["git", "add", "-A"], cwd=work, check=True)
    subprocess.run(["git", "commit", "-qm", "pipeline"], cwd=work, check=True)
    before = _snapshot(work)
    assert {k: v for k, v in before.items() if k in hand} == hand

    # the case: an experiment that fails (here: a weights file that does not exist)
    failed = _dvc("exp", "run", "-S", f"extract.weights={work / 'missing.weights.h5'}", cwd=work)
    assert failed.returncode != 0
    assert _snapshot(work) == before
    assert sorted(p.name for p in (work / "cache/heads").iterdir()) == ["vgg16-dense", "vgg16-logistic"]

    # Ctrl-C while stage one runs (slow settings so that it is still running)
    # (Keras runtime at 600 px: seconds per image, so that the signal lands mid-extraction; a run that
    # finished first would let DVC go on to the next stages)
    params["extract"].update(input_size=600, batch_size=1, runtime="keras")
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    # (SIGINT back to its default in the child: a handler left ignoring it in this process by an earlier
    # test, e.g. Ray's, would be inherited, and the run would ignore the Ctrl-C)
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=work, env=dvc_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    partial = work / "cache/dvc/features/.vgg16.h5.progress.json"
    deadline = time.monotonic() + 240
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "extraction finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=120)
    assert _snapshot(work) == before

    # other settings that succeed: DVC's own outputs are replaced (their old versions are in its cache)
    params["extract"].update(input_size=40, batch_size=8)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    ok = _dvc("repro", cwd=work)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    now = _snapshot(work)
    assert now["dvc/features/vgg16.h5"] != before["dvc/features/vgg16.h5"]
    assert {k: v for k, v in now.items() if k in hand} == hand

    # a file the user put at a path DVC owns, not in DVC's cache, is not replaced by a stage either
    assert _tlpipe("extract", "--base", "vgg16", "--data", str(data), "--weights", "none", "--input-size", "48",
                   "--no-progress", "--out", "cache/dvc/features/vgg16.h5", "--force") == 0
    mine = (work / "cache/dvc/features/vgg16.h5").read_bytes()
    refused = _dvc("repro", cwd=work)
    assert refused.returncode != 0
    assert "not in DVC's cache, so DVC stage extract@vgg16 will not replace it" in refused.stdout + refused.stderr
    assert (work / "cache/dvc/features/vgg16.h5").read_bytes() == mine


def test_bytes_in_dvc_cache_only_excuse_a_dvc_stage(tmp_path, monkeypatch):
    """A copy of a pipeline file has its bytes in DVC's cache, yet nothing restores it at its own
    path: only a DVC stage replacing its own output may rely on the cache."""
    from pipeline.core.safety import OutputExists, check_replace, in_dvc_cache

    (tmp_path / ".dvc").mkdir()
    mine = tmp_path / "cache" / "features" / "copy.h5"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"features I copied from the pipeline")
    md5 = hashlib.md5(mine.read_bytes()).hexdigest()
    obj = tmp_path / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    obj.parent.mkdir(parents=True)
    obj.write_bytes(mine.read_bytes())
    assert in_dvc_cache(mine)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    with pytest.raises(OutputExists, match="--force"):
        check_replace(mine, "features", ["limit 0 -> 10"], force=False)
    monkeypatch.setenv("DVC_STAGE", "extract@vgg16")
    check_replace(mine, "features", ["limit 0 -> 10"], force=False)  # DVC's own output: restorable
    obj.unlink()
    with pytest.raises(OutputExists, match="not in DVC's cache"):
        check_replace(mine, "features", ["limit 0 -> 10"], force=False)


def test_an_out_path_of_the_wrong_kind_is_one_line_and_leaves_nothing(tmp_path):
    """--out naming a folder where a file goes, a file where a folder goes, or a path under a file:
    one line, exit 2, before any work, nothing left beside it (it used to be a Python error, exit 1,
    with a .partial left over)."""
    from click.testing import CliRunner

    from conftest import make_folder
    from pipeline.cli import cli

    data = make_folder(tmp_path / "data", per_class=4)
    mine = tmp_path / "mine.txt"
    mine.write_text("mine")
    folder = tmp_path / "folder"
    (folder / "inner").mkdir(parents=True)
    common = ["--base", "mobilenet_0.25", "--data", str(data), "--weights", "none", "--input-size", "32"]
    before = sorted(p.name for p in tmp_path.iterdir())
    for out, force, message in ((folder, True, "is a folder"), (mine / "x.h5", False, "is a file, not a folder")):
        r = CliRunner().invoke(cli, ["extract", *common, "--out", str(out), *(["--force"] if force else [])])
        assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before and mine.read_text() == "mine"
    feats = tmp_path / "f.h5"
    assert CliRunner().invoke(cli, ["extract", *common, "--out", str(feats)]).exit_code == 0
    r = CliRunner().invoke(cli, ["fit-head", "--features", str(feats), "--out", str(mine)])
    assert r.exit_code == 2 and "is a file; give a folder path" in r.output and mine.read_text() == "mine"
    # a file tlpipe did not make at an --out: refused, in words that say so
    r = CliRunner().invoke(cli, ["extract", *common, "--out", str(mine)])
    assert r.exit_code == 2 and "was not made by tlpipe" in r.output and mine.read_text() == "mine"


def test_every_command_writing_a_named_file_keeps_a_file_the_user_made(tmp_path, monkeypatch):
    """manifest, learning-curve and report replace their own earlier outputs, never a file of the user's
    (one line, exit 2, --force to replace); export refuses a path under a file before building; a
    fit-head that fails half-way leaves no hidden folder behind."""
    data = make_folder(tmp_path / "data", per_class=6)
    run = CliRunner().invoke

    def mine(path, text="mine"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    m = mine(tmp_path / "m.json")
    r = run(cli, ["manifest", "--data", str(data), "--out", str(m)])
    assert r.exit_code == 2 and "not a manifest written by tlpipe" in r.output and m.read_text() == "mine"
    for _ in range(2):
        assert run(cli, ["manifest", "--data", str(data), "--out", str(tmp_path / "own.json")]).exit_code == 0
    assert run(cli, ["manifest", "--data", str(data), "--out", str(m), "--force"]).exit_code == 0

    feats = tmp_path / "f.h5"
    assert run(cli, ["extract", "--base", "mobilenet_0.25", "--data", str(data), "--weights", "none",
                     "--input-size", "32", "--out", str(feats)]).exit_code == 0
    lc = mine(tmp_path / "lc.csv")
    args = ["learning-curve", "--features", str(feats), "--sizes", "4,all", "--seeds", "1"]
    r = run(cli, [*args, "--out", str(lc)])
    assert r.exit_code == 2 and "not a learning curve written by tlpipe" in r.output and lc.read_text() == "mine"
    r = run(cli, [*args, "--out", str(tmp_path / "notes.txt")])
    assert r.exit_code == 2 and "give a .csv path" in r.output
    lc2 = tmp_path / "own.csv"
    js = mine(tmp_path / "own.json", '{"mine": 1}')  # the summary's place beside the CSV
    r = run(cli, [*args, "--out", str(lc2)])
    assert r.exit_code == 2 and "learning-curve summary" in r.output and js.read_text() == '{"mine": 1}'
    js.unlink()
    for _ in range(2):
        assert run(cli, [*args, "--out", str(lc2)]).exit_code == 0

    cache = tmp_path / "cache"
    assert run(cli, ["fit-head", "--features", str(feats), "--out", str(cache / "heads" / "h")]).exit_code == 0
    md = mine(cache / "report.md", "# my notes\n")
    r = run(cli, ["report", "--cache-dir", str(cache)])
    assert r.exit_code == 2 and "not a report written by tlpipe" in r.output and md.read_text() == "# my notes\n"
    md.unlink()
    for _ in range(2):
        assert run(cli, ["report", "--cache-dir", str(cache)]).exit_code == 0

    r = run(cli, ["export", "--head", str(cache / "heads" / "h"), "--out", str(lc / "m.keras"), "--weights", "none"])
    assert r.exit_code == 2 and "is a file, not a folder" in r.output

    import pipeline.heads.models

    def broken(self, *a, **k):
        raise RuntimeError("fit failed")

    for cls in vars(pipeline.heads.models).values():
        if isinstance(cls, type) and hasattr(cls, "fit") and getattr(cls, "name", None) == "logistic":
            monkeypatch.setattr(cls, "fit", broken)
    r = run(cli, ["fit-head", "--features", str(feats), "--out", str(tmp_path / "h2")])
    assert r.exit_code == 1 and "fit failed" in r.output
    assert not (tmp_path / ".h2.tmp").exists() and not (tmp_path / "h2").exists()
