"""The ``tlpipe`` command line: parse options, call one stage function, print the result.

User mistakes end in one line on stderr with exit code 2 (usage) or 1 (runtime);
``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from pipeline import __version__
from pipeline.core.errors import TlpipeError, UsageError
from pipeline.core.util import loud_tensorflow, quiet_tensorflow, setup_logging

log = logging.getLogger("tlpipe")


_GLOBAL_FLAGS = {"--debug", "-q", "--quiet", "-v", "-vv", "-vvv", "--verbose"}


def _from_params(ctx: click.Context, param: click.Parameter, value):
    """A path value written ``FILE.yaml:KEY`` (``params.yaml:data.source``) is read from that YAML file:
    dvc.yaml passes paths this way, so that no shell quoting can break one (spaces, quotes, ``$``, é)."""
    from pipeline.core.util import param_reference

    return param_reference(value)


class _Group(click.Group):
    """Turns library exceptions into one line and an exit code; takes the global flags
    (``--debug``, ``-v``, ``-q``) after the command too (``tlpipe extract ... --debug``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            head, tail = args[: args.index("--")], args[args.index("--"):]
        else:
            head, tail = args, []
        flags = [a for a in head if a in _GLOBAL_FLAGS]
        rest = [a for a in head if a not in _GLOBAL_FLAGS]
        try:
            return super().parse_args(ctx, flags + rest + tail)
        except click.UsageError as exc:  # a wrong option before the command: one line too, exit 2
            loud = "--debug" in flags or any(a.startswith("-v") for a in flags)
            if loud or isinstance(exc, click.exceptions.NoArgsIsHelpError):  # (bare 'tlpipe': the help)
                raise
            click.echo(f"tlpipe: error: {exc.format_message()}{self._option_hint(exc)} (see 'tlpipe --help')",
                       err=True)
            ctx.exit(2)

    def _option_hint(self, exc: click.UsageError) -> str:
        """For an option that belongs to commands (``tlpipe --cache-dir x bases``): say where it goes."""
        name = getattr(exc, "option_name", None)
        if not isinstance(exc, click.NoSuchOption) or not name:
            return ""
        users = [n for n, c in self.commands.items() if any(name in p.opts for p in c.params)]
        if not users:
            return ""
        shown = ", ".join(users[:4]) + (", ..." if len(users) > 4 else "")
        return f" ({name} is an option of {shown}: put it after the command, e.g. tlpipe {users[0]} {name} ...)"

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # click's own three-line usage errors become one line
            if (ctx.obj or {}).get("debug"):
                raise
            sub = exc.ctx.command_path if exc.ctx is not None else "tlpipe"
            click.echo(f"tlpipe: error: {exc.format_message()} (see '{sub} --help')", err=True)
            ctx.exit(2)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except TlpipeError as exc:
            if (ctx.obj or {}).get("debug"):
                raise
            click.echo(f"tlpipe: error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            resumable = ctx.invoked_subcommand in ("extract", "fine-tune", "baseline")
            click.echo("tlpipe: interrupted; " + ("run the same command again to resume" if resumable else
                       "no output was replaced (run the command again)"), err=True)
            ctx.exit(130)
        except Exception as exc:  # noqa: BLE001 - anything unexpected still ends in one line
            if (ctx.obj or {}).get("debug"):
                raise
            backend = os.environ.get("KERAS_BACKEND", "")
            if isinstance(exc, ModuleNotFoundError) and backend and exc.name == backend:
                click.echo(f"tlpipe: error: KERAS_BACKEND={backend} but the {backend} package is not installed: "
                           f"pip install {backend}, or unset KERAS_BACKEND (TensorFlow)", err=True)
                ctx.exit(2)
            text = str(exc).strip().splitlines()
            click.echo(f"tlpipe: error: {type(exc).__name__}: {text[0] if text else ''} "
                       "(run with --debug for the traceback)", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tlpipe")
@click.option("-v", "--verbose", count=True, help="More logging and tracebacks on errors (-vv: debug logging).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool, debug: bool) -> None:
    """tlpipe: cache frozen ImageNet-base features once (extract), fit many heads on them (fit-head).

    --debug, -v and -q may also follow the command."""
    if not verbose and not debug:
        quiet_tensorflow()  # TensorFlow's start-up lines stay off stderr (-v shows them)
    else:
        loud_tensorflow()  # `import pipeline` made them quiet for the Python API
    setup_logging(-1 if quiet else verbose)
    ctx.obj = {"debug": debug or verbose >= 1, "quiet": quiet}


@cli.command("bases")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def bases_cmd(as_json: bool) -> None:
    """List the bases: name, aliases, input size, feature size, weights cached? (hub: KerasHub presets)"""
    from pipeline.nets.backbones import BACKBONES, hub_bases
    from pipeline.nets.hub import INSTALL, cached_download, download_cache_root, keras_hub_available
    from pipeline.nets.weights import cached_weights_path, keras_cache_dir

    rows = [{"name": b.name, "aliases": list(b.aliases), "input_size": b.input_size,
             "feature_size": b.feature_size, "constructor": f"keras.applications.{b.constructor}",
             "weights_cached": cached_weights_path(b) is not None, "weights_file": b.weights_file,
             "hub": False, "pooling": "avg"}
            for b in BACKBONES.values()]
    have_hub = keras_hub_available()
    rows += [{"name": b.name, "aliases": [], "input_size": b.input_size, "feature_size": b.feature_size,
              "constructor": b.constructor_path, "weights_cached": have_hub and cached_download(b) is not None,
              "weights_file": "", "hub": True, "pooling": b.default_pooling, "family": b.family}
             for b in hub_bases()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'name':44s} {'input':>5s} {'features':>8s}  {'pooling':8s} cached  aliases")
    for r in rows:
        click.echo(f"{r['name']:44s} {r['input_size']:5d} {r['feature_size']:8d}  {r['pooling']:8s} "
                   f"{'yes' if r['weights_cached'] else 'no':6s}  {', '.join(r['aliases'])}")
    click.echo(f"\nImageNet weights cache: {keras_cache_dir()} (override with KERAS_HOME)")
    state = "installed" if have_hub else f"not installed: {INSTALL}"
    click.echo(f"hub:PRESET bases are KerasHub presets ({state}); their downloads: {download_cache_root()}, "
               "or --weights DIR with a preset folder")


@cli.command("extract")
@click.option("--base", required=True, help="Base name or alias (see 'tlpipe bases'), e.g. vgg16, googlenet; "
                                             "a KerasHub preset as hub:PRESET, e.g. hub:dinov2_small.")
@click.option("--data", default="tfds:cats_vs_dogs", show_default=True, callback=_from_params,
              help="tfds:NAME, or a folder with one subfolder per class (or train/ val/ test/ subfolders); "
                   "params.yaml:KEY reads it from that file (as dvc.yaml does).")
@click.option("--split", default="80/10/10", show_default=True,
              help="train/val/test percentages (ignored when the folder has train/ val/ subfolders).")
@click.option("--weights", default="imagenet", show_default=True, callback=_from_params,
              help="imagenet (Keras download + cache), none, a .h5/.weights.h5 file, or a folder holding one "
                   "(a hub base: a KerasHub preset folder, DIR or DIR/PRESET); params.yaml:KEY reads it from that "
                   "file.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output HDF5 file [default: CACHE/features/BASE.h5].")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=Path("cache"), show_default=True)
@click.option("--input-size", type=click.IntRange(0), default=0,
              help="Square input size (0: the base's own default).")
@click.option("--pooling", type=click.Choice(["auto", "avg", "max", "cls", "mean", "cls_mean", "embed"]),
              default="auto", show_default=True, help="auto: avg for keras.applications bases; a hub base's own (see 'tlpipe bases').")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--decode-threads", type=click.IntRange(0), default=None,
              help="Decode threads per model (this process, or each Ray actor). 0: a quarter of the cores with "
                   "Keras on a CPU, one per core with OpenVINO or an accelerator.  [default: 0]")
@click.option("--actors", type=click.IntRange(0), default=None,
              help="Ray engine: model actors (0: 1).  [default: 0]")
@click.option("--workers", type=click.IntRange(0), default=0,
              help="Older name: --decode-threads with the local engine, --actors with the ray engine.")
@click.option("--limit", type=click.IntRange(0), default=0, help="At most this many images per split (0: all).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue an interrupted run from its last completed batch.")
@click.option("--force", is_flag=True,
              help="Extract again even if up to date, and replace an --out file made from other settings "
                   "(without it, such a file is never replaced).")
@click.option("--tfds-data-dir", default=None, help="tensorflow-datasets data folder.")
@click.option("--mixed-precision", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="float16 compute (auto: on GPUs only); features are stored as float32.")
@click.option("--runtime", default="auto", show_default=True,
              help="auto | keras | openvino. auto: OpenVINO on x86-64 CPUs (when installed, TensorFlow backend), "
                   "Keras elsewhere (docs/guide/extract.md, CPU runtime).")
@click.option("--precision", default="auto", show_default=True,
              help="auto | f32 | bf16 | fp16. bf16: OpenVINO on CPUs with AMX/AVX512-BF16; "
                   "fp16: Keras float16 (for GPUs; slower on a CPU); auto: f32 on CPUs, fp16 per --mixed-precision on GPUs.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Who runs the partitions: this process, or model actors on a Ray cluster "
                   '(needs pip install "tlpipe[ray]").')
@click.option("--ray-address", default=None,
              help="Ray engine: a running cluster (HOST:PORT of 'ray start --head', ray://HOST:PORT, or auto); "
                   "default: start a local one.")
@click.option("--gpus-per-worker", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Ray engine: GPUs per model actor.")
@click.option("--shard-size", type=click.IntRange(1), default=1000, show_default=True,
              help="Ray engine: images per shard (the unit of work and of resume).")
@click.option("--shard", default=None, metavar="I/N",
              help="Write only shard I of N (0 <= I < N; a deterministic part of every split) to a shard file, "
                   "e.g. one per Slurm array task; join them with 'tlpipe merge'.")
@click.option("--layers", default="last", show_default=True,
              help="Depths to pool and store: last (the base's output), blocks (every block or stage of the base), "
                   "or layer names separated by commas (a hub base: its KerasHub feature pyramid levels, e.g. "
                   "stage1 or P3). Several depths cost one pass; fit-head chooses among them.")
@click.option("--views", type=click.IntRange(0), default=0, show_default=True,
              help="Also store K augmented views of each training image (1: its mirror; more: small crops) and "
                   "the mirror of each val/test image (test-time view), as splits SPLIT_viewK (every engine).")
def extract_cmd(base, data, split, weights, out, cache_dir, input_size, pooling, batch_size, decode_threads, actors,
                workers, limit, resume, force, tfds_data_dir, mixed_precision, runtime, precision, progress, engine,
                ray_address, gpus_per_worker, shard_size, shard, layers, views) -> None:
    """Stage one: run the frozen base once over every split, cache pooled features in HDF5."""
    from pipeline.stage1.extract import ExtractConfig, extract
    from pipeline.store.features import read_attrs

    if decode_threads is None:
        decode_threads = workers if engine == "local" else 0
    if actors is None:
        actors = workers if engine == "ray" else 0
    path = extract(ExtractConfig(
        base=base, data=data, split=split, weights=weights, out=out, cache_dir=cache_dir,
        input_size=input_size or None, pooling=pooling, batch_size=batch_size, decode_threads=decode_threads,
        actors=actors, limit=limit or None,
        resume=resume, force=force, tfds_data_dir=tfds_data_dir, mixed_precision=mixed_precision,
        runtime=runtime, precision=precision, progress=progress, engine=engine, ray_address=ray_address,
        gpus_per_worker=gpus_per_worker, shard_size=shard_size, shard=shard, layers=layers, views=views))
    a = read_attrs(path)
    click.echo(f"{path}: {a['base']} ({a['feature_size']} features), rows {json.dumps(a['counts'])}, "
               f"skipped {a['skipped_count']}, {a['images_per_second']} images/s, "
               f"runtime {a.get('runtime', 'keras')} {a.get('precision', 'f32')}")


@cli.command("merge")
@click.argument("shards", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The merged features file.")
@click.option("--copy", is_flag=True,
              help="Write one self-contained file (default: an HDF5 virtual dataset over the shards, no copy; "
                   "keep the shards where they are relative to it).")
@click.option("--force", is_flag=True, help="Replace an existing --out file.")
def merge_cmd(shards, out, copy, force) -> None:
    """Join the shard files of 'tlpipe extract --shard I/N' into one features file.

    Checks that all N shards are there, with one fingerprint, no overlap and none truncated."""
    from pipeline.store.features import read_attrs
    from pipeline.store.shards import merge_shards

    path = merge_shards(list(shards), out, copy=copy, force=force)
    a = read_attrs(path)
    click.echo(f"{path}: {len(shards)} shards ({'copy' if copy else 'virtual dataset'}), "
               f"rows {json.dumps(a['counts'])}, skipped {a['skipped_count']}")


@cli.command("info")
@click.argument("file")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=Path("cache"), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the attributes as JSON.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Re-list the data source and report whether the file is stale.")
def info_cmd(file, cache_dir, as_json, check) -> None:
    """Show a features file (provenance, rows per split, skipped inputs, staleness) or a head folder
    (base, head, features, chosen C/k/epoch, val and test accuracy, staleness)."""
    from pipeline.store.features import load_features, resolve_features_path, staleness

    if Path(file).is_dir():
        click.echo(_head_info(Path(file), as_json, check, cache_dir))
        return
    path = resolve_features_path(file, cache_dir)
    fs = load_features(path, need=())
    attrs = dict(fs.attrs)
    stale, why = staleness(path) if check else (None, "not checked")
    attrs["stale"], attrs["stale_reason"] = stale, why
    if as_json:
        click.echo(json.dumps(attrs, indent=2, default=str))
        return
    click.echo(str(path))
    attrs.setdefault("runtime", "keras")  # files from before the runtime option
    attrs.setdefault("precision", "fp16" if attrs.get("mixed_precision") else "f32")
    for key in ("base", "weights", "weights_sha256", "input_size", "pooling", "preprocessing", "feature_size",
                "runtime", "precision", "layers", "depths", "depth_dims", "views",
                "data_source", "split_spec", "split_rule", "class_names", "counts", "skipped_count", "images_per_second",
                "extract_seconds", "tlpipe_version", "keras_version", "keras_backend", "tensorflow_version",
                "created", "fingerprint"):
        if key in attrs:
            click.echo(f"  {key:20s} {attrs[key]}")
    for s in attrs.get("skipped") or []:
        click.echo(f"  skipped: {s['split']}/{s['id']}: {s['reason']}")
    if check:
        click.echo(f"  {'status':20s} {'STALE: ' + why if stale else 'up to date (' + why + ')'}")


def _head_info(folder: Path, as_json: bool, check: bool, cache_dir: Path = Path("cache")) -> str:
    """``tlpipe info HEAD_DIR``: the head's evaluation summary (fit-head, fine-tune or baseline folders)."""
    from pipeline.store.features import head_status

    ev_path = folder / "evaluation.json"
    if not ev_path.is_file():
        raise UsageError(f"{folder} is a folder, not a features file or a head folder (no evaluation.json); "
                         "give a features file or a folder written by fit-head, fine-tune or baseline")
    try:
        ev = json.loads(ev_path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{ev_path} is not readable JSON ({exc})") from None
    status, why = head_status(folder, cache_dir)[:2] if check else ("not checked", "")
    if as_json:
        return json.dumps({**ev, "status": status, "status_reason": why}, indent=2, default=str)
    tuning = ev.get("tuning") or {}
    chosen = (f"{tuning.get('param')}={tuning.get('chosen')}" + (f" (CV accuracy {tuning['cv_accuracy']:.4f})"
              if isinstance(tuning.get("cv_accuracy"), (int, float)) else "")) if tuning.get("chosen") is not None \
        else "none"
    features = ev.get("features") or ev.get("data_source") or ""
    rows = [("base", ev.get("base", "")), ("head", ev.get("head", "")),
            ("features", ", ".join(features) if isinstance(features, list) else features),
            ("classes", ", ".join(map(str, ev.get("classes") or []))), ("chosen", chosen)]
    depth = ev.get("depths") or {}
    if depth.get("depths"):
        rows.append(("depths", f"{', '.join(depth['depths'])} ({depth.get('how', '')})"))
    if "test_time_mirror" in depth:
        rows.append(("views", f"{depth.get('train_views', 0)} per training photo; test-time mirror "
                              f"{'on' if depth['test_time_mirror'] else 'off'}"))
    for split in ("val", "test"):
        s = (ev.get("splits") or {}).get(split)
        if s:
            rows.append((f"{split} accuracy", f"{s['accuracy']:.4f} (n={s.get('n', '?')}, log loss "
                                              f"{s.get('log_loss', float('nan')):.4f})"))
    if check and status != "unknown":
        rows.append(("status", status if status == "ok" else f"{status.upper()}: {why}"))
    return "\n".join([str(folder)] + [f"  {k:20s} {v}" for k, v in rows])


@cli.command("fit-head")
@click.option("--features", "features", multiple=True, required=True,
              help="Features file (path or bare name in CACHE/features or CACHE/dvc/features). Repeat to fuse several files "
                   "(other bases, or one base at other input sizes).")
@click.option("--head", default="logistic", show_default=True,
              help="logistic, dense, svm, rbf-svm, knn, auto (depths, ridge strength and test-time mirror chosen "
                   "by grouped CV on train: the recommended recipe on features extracted with --layers blocks), or "
                   "ensemble (logistic, svm and knn stacked on their out-of-fold probabilities, chosen on train).")
@click.option("--layers", default="all", show_default=True,
              help="Stored depths the head may use: all (auto chooses among them by CV on train; other heads use "
                   "them all) or names separated by commas (files extracted with --layers blocks or NAME,NAME).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder [default: CACHE/heads/FEATURES-HEAD].")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=Path("cache"), show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--epochs", type=click.IntRange(1), default=50, show_default=True, help="Dense: most epochs.")
@click.option("--patience", type=click.IntRange(1), default=5, show_default=True,
              help="Dense: early-stopping patience, on the loss of a 10% slice of train (never val).")
@click.option("--hidden", type=click.IntRange(1), default=256, show_default=True, help="Dense: hidden units.")
@click.option("--dropout", type=click.FloatRange(0, 0.95), default=0.5, show_default=True)
@click.option("--class-weight", type=click.Choice(["none", "balanced"]), default="none", show_default=True)
@click.option("--force", is_flag=True,
              help="Replace an --out head folder fitted from other features or parameters "
                   "(without it, such a folder is never replaced).")
@click.option("--stream/--no-stream", default=None,
              help="Read the features from disk one chunk at a time instead of loading them (logistic: the "
                   "in-memory objective by L-BFGS, one pass per step, C chosen on a 10% slice of train; dense: "
                   "fed from the chunks). "
                   "Default: stream when the in-memory estimate (3x the features' float32 bytes, from the "
                   "HDF5 shapes) exceeds --max-memory.")
@click.option("--max-memory", default=None, metavar="SIZE",
              help="Memory an in-memory fit may use, e.g. 4GB, 512MB, 1.5GiB [default: half the RAM].")
@click.option("--chunk-rows", type=click.IntRange(0), default=0, show_default=True,
              help="Streamed: rows per chunk (0: about 32 MiB of features).")
@click.option("--allow-mixed-precision", is_flag=True,
              help="Fuse features files computed in different precisions (e.g. f32 and bf16).")
@click.option("--tensorboard", type=click.Path(path_type=Path), default=None,
              help="Dense: write TensorBoard logs here (train and early-stopping slice per epoch); "
                   "other heads do not train in epochs and ignore it with a warning.")
def fit_head_cmd(features, head, layers, out, cache_dir, seed, epochs, patience, hidden, dropout, class_weight,
                 force, stream, max_memory, chunk_rows, allow_mixed_precision,
                 tensorboard) -> None:
    """Stage two: fit a head on cached features; write the head, metrics.json, evaluation.json and
    history.csv (dense) or grid.csv (C, k).

    C and k are chosen by stratified cross-validation on train, the dense head's epochs by early
    stopping on a 10% slice of train: val and test are never used for tuning.

    Features larger than memory: logistic and dense stream them from the HDF5 file in chunks
    (--stream, or automatically above --max-memory); the head folder and exports are the same.

    Features with several depths (extract --layers blocks) or views (--views): --head auto chooses the
    depths, its ridge strength and whether to average each image with its mirror, by CV on train.
    """
    from pipeline.stage2.fit_head import FitConfig, fit_head, summary
    from pipeline.heads.auto import get_any_head
    from pipeline.heads.models import HeadParams

    from pipeline.heads.stream import parse_size

    get_any_head(head)
    limit = parse_size(max_memory) if max_memory is not None else None
    params = HeadParams(seed=seed, epochs=epochs, patience=patience, hidden=hidden, dropout=dropout,
                        class_weight=None if class_weight == "none" else class_weight)
    path = fit_head(FitConfig(features=list(features), head=head, out=out, cache_dir=cache_dir, params=params,
                              force=force, stream=stream, max_memory=limit, chunk_rows=chunk_rows,
                              allow_mixed_precision=allow_mixed_precision, tensorboard=tensorboard, layers=layers))
    click.echo(summary(path))


@cli.command("fine-tune")
@click.option("--head", "head_dir", type=click.Path(path_type=Path), required=True,
              help="A fitted dense, logistic or auto head folder (CACHE/heads/FEATURES-HEAD) on one features "
                   "file, of any depths.")
@click.option("--unfreeze", default="block", show_default=True,
              help="Layers of the base to train: N from the top, a block name (from that block to the top; "
                   "a wrong name lists the valid ones), all, or block (the base's last block). "
                   "BatchNorm layers stay frozen, in inference mode.")
@click.option("--epochs", type=click.IntRange(1), default=10, show_default=True, help="Most epochs.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-5, show_default=True,
              help="Adam learning rate.")
@click.option("--augment", default="flip,rotate=0.1,zoom=0.2,shift=0.1,contrast=0.1", show_default=True,
              help="Training-only augmentation (Keras preprocessing layers), or none. Never applied to val/test.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--patience", type=click.IntRange(1), default=3, show_default=True,
              help="Early-stopping patience, on the loss of a 10% slice of train (never val).")
@click.option("--weights", default=None,
              help="imagenet, none, a weights file or a folder [default: as recorded in the features file].")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder [default: CACHE/finetuned/FEATURES-HEAD].")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=Path("cache"), show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace an --out folder made from other settings.")
@click.option("--tensorboard", type=click.Path(path_type=Path), default=None, help="Write TensorBoard logs here.")
@click.option("--views", type=int, default=None,
              help="Cached views: run the frozen bottom of the base once over K views of each training image "
                   "(view 0 un-augmented, K-1 augmented) and once over val/test, cache its activations in HDF5 "
                   "beside --out (reused by reruns with the same settings), and train only the unfrozen top on "
                   "them, one view per image per epoch. [default: off, end to end on the images]")
def fine_tune_cmd(head_dir, unfreeze, epochs, lr, augment, batch_size, patience, weights, out, cache_dir, seed,
                  force, tensorboard, views) -> None:
    """Stage three: train the top of the base with the fitted head, end to end on the images.

    Epoch 0 is the head as fitted; the best epoch is chosen by early stopping on a 10% slice of
    train (val and test are never used for tuning). A checkpoint after each epoch: run the same
    command again to resume. Writes model.keras (as 'tlpipe export'), metrics.json,
    evaluation.json, history.csv, predictions.csv, roc.csv and figures/. With --views K, epochs
    train only the top on cached activations of the frozen bottom (much faster per epoch)."""
    from pipeline.stage3.finetune import FineTuneConfig, fine_tune, summary

    path = fine_tune(FineTuneConfig(head=head_dir, unfreeze=unfreeze, epochs=epochs, lr=lr, augment=augment,
                                    batch_size=batch_size, patience=patience, weights=weights, out=out,
                                    cache_dir=cache_dir, seed=seed, force=force, tensorboard=tensorboard,
                                    views=views))
    click.echo(summary(path))


@cli.command("baseline")
@click.option("--data", default="tfds:cats_vs_dogs", show_default=True, callback=_from_params,
              help="tfds:NAME, or a folder with one subfolder per class (or train/ val/ test/ subfolders); "
                   "params.yaml:KEY reads it from that file (as dvc.yaml does).")
@click.option("--split", default="80/10/10", show_default=True,
              help="train/val/test percentages (ignored when the folder has train/ val/ subfolders).")
@click.option("--input-size", type=click.IntRange(16), default=180, show_default=True,
              help="Square input size of the convnet (images are resized as extraction does).")
@click.option("--epochs", type=click.IntRange(1), default=30, show_default=True,
              help="Most epochs (a killed run resumed with a smaller --epochs finishes at that epoch).")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=3e-4, show_default=True,
              help="Adam learning rate.")
@click.option("--augment", default="flip,rotate=0.1,zoom=0.2,shift=0.1,contrast=0.1", show_default=True,
              help="Training-only augmentation (the same layers as fine-tune), or none. Never applied to val/test.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--patience", type=click.IntRange(1), default=5, show_default=True,
              help="Early-stopping patience, on the loss of a 10% slice of train (never val).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--limit", type=click.IntRange(0), default=0, help="At most this many images per split (0: all).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder [default: CACHE/baseline/NAME, NAME the data folder's or tfds dataset's name].")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=Path("cache"), show_default=True)
@click.option("--force", is_flag=True, help="Replace an --out folder made from other settings or data.")
@click.option("--tensorboard", type=click.Path(path_type=Path), default=None, help="Write TensorBoard logs here.")
@click.option("--tfds-data-dir", default=None, help="tensorflow-datasets data folder.")
def baseline_cmd(data, split, input_size, epochs, lr, augment, batch_size, patience, seed, limit, out, cache_dir,
                 force, tensorboard, tfds_data_dir) -> None:
    """Baseline: the tutorials' small convnet trained from scratch on the images (no ImageNet base).

    The same data, split and decoding as extract, the same augmentation as fine-tune; the best
    epoch is chosen by early stopping on a 10% slice of train (val and test are never used for
    tuning). A checkpoint after each epoch: run the same command again to resume. Writes
    model.keras (as 'tlpipe export'), metrics.json, evaluation.json, history.csv,
    predictions.csv, roc.csv and figures/; 'tlpipe report' lists it beside the heads."""
    from pipeline.stage3.baseline import BaselineConfig, baseline, summary

    path = baseline(BaselineConfig(data=data, split=split, input_size=input_size, epochs=epochs, lr=lr,
                                   augment=augment, batch_size=batch_size, patience=patience, seed=seed,
                                   limit=limit, out=out, cache_dir=cache_dir, force=force, tensorboard=tensorboard,
                                   tfds_data_dir=tfds_data_dir))
    click.echo(summary(path))


@cli.command("report")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=Path("cache"), show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder to write report.md, report.json and plots/comparison.csv/.png in [default: CACHE].")
@click.option("--force", is_flag=True,
              help="Replace report.md, report.json or plots/comparison.csv/.png files that tlpipe report did "
                   "not write.")
def report_cmd(cache_dir, out, force) -> None:
    """Compare every fitted head: CACHE/report.md, report.json and plots/comparison.csv and .png."""
    from pipeline.reporting.report import ReportConfig, report

    path = report(ReportConfig(cache_dir=cache_dir, out_dir=out, force=force))
    click.echo(path.read_text())


@cli.command("manifest")
@click.option("--data", default="tfds:cats_vs_dogs", show_default=True, callback=_from_params,
              help="As for extract (params.yaml:KEY reads it from that file).")
@click.option("--split", default="80/10/10", show_default=True)
@click.option("--tfds-data-dir", default=None)
@click.option("--out", type=click.Path(path_type=Path), default=Path("cache/manifest.json"), show_default=True)
@click.option("--force", is_flag=True, help="Replace an --out file that tlpipe manifest did not write.")
def manifest_cmd(data, split, tfds_data_dir, out, force) -> None:
    """List the data source (classes, images per split, fingerprint) into a JSON manifest.

    DVC runs this on every 'dvc repro'; extraction reruns only when the manifest changes.
    """
    from pipeline.data.sources import is_manifest, open_source
    from pipeline.core.safety import guard_user_file
    from pipeline.core.util import write_json

    guard_user_file(out, "a manifest", is_manifest, force)
    src = open_source(data, split, tfds_data_dir)
    write_json(out, src.manifest())
    click.echo(f"{out}: {src.spec}, classes {len(src.class_names)}, images {json.dumps(src.counts)}")


@cli.command("export")
@click.option("--head", "head_dir", type=click.Path(path_type=Path), required=True,
              help="A fitted head folder (CACHE/heads/FEATURES-HEAD).")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Output: a .keras file, a SavedModel folder, or a .tflite file (see --format).")
@click.option("--format", "fmt", type=click.Choice(["keras", "savedmodel", "tflite"]), default="keras",
              show_default=True, help="keras: one .keras file; savedmodel: a folder for TF Serving; "
                                      "tflite: a .tflite file for mobile (fixed input size).")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@click.option("--base", default=None,
              help="Base name; must be the head's (one of them if fused) [default: the head's bases].")
@click.option("--weights", default=None,
              help="imagenet, none, a weights file or a folder [default: as recorded in the features file].")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=Path("cache"), show_default=True)
def export_cmd(head_dir, out, fmt, force, base, weights, cache_dir) -> None:
    """One model: uint8 RGB image in, class probabilities [N, K] out (resize and preprocessing inside).

    Logistic and dense heads use built-in Keras layers only: the .keras file loads with
    keras.saving.load_model and no tlpipe. svm, rbf-svm and knn heads need 'import
    pipeline.deploy.export' first (or --format savedmodel, which runs with TensorFlow alone).
    Class names and provenance: tlpipe.json inside the .keras zip, assets.extra/tlpipe.json in
    a SavedModel, NAME.json and NAME.labels.txt beside a .tflite file.

    A head on fused features gets one branch per features file, and one image input per
    input size when the branches need several ('tlpipe predict' feeds them)."""
    from pipeline.deploy.export_spec import ExportConfig, check_export, custom_layer_note
    from pipeline.store.features import head_status

    cfg = ExportConfig(head=head_dir, out=out, base=base, weights=weights, cache_dir=cache_dir, format=fmt,
                       force=force)
    check_export(cfg)  # the head folder, --out and the format, before TensorFlow is imported
    status, why, _ = head_status(head_dir, cache_dir)
    if status in ("stale", "features missing"):
        log.warning("%s is %s: %s; fit it again before exporting", head_dir, status, why)
    from pipeline.deploy.export import export_model, read_metadata

    path = export_model(cfg)
    size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    click.echo(f"{path}: exported {head_dir} as {fmt} ({size / 1e6:.1f} MB)")
    note = custom_layer_note(read_metadata(path)["head"], fmt)
    if note:
        click.echo(f"tlpipe: {note}", err=True)


@cli.command("predict")
@click.argument("images", nargs=-1, required=True)
@click.option("--model", "model_path", type=click.Path(path_type=Path), required=True,
              help="A model written by 'tlpipe export'.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Write here instead of stdout (an earlier prediction file is replaced; any other file only "
                   "with --force).")
@click.option("--force", is_flag=True, help="Replace an --out file that tlpipe predict did not write.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--runtime", default="auto", show_default=True,
              help="auto | keras | openvino (as for extract: OpenVINO on x86-64 CPUs when installed).")
@click.option("--precision", default="auto", show_default=True, help="auto | f32 | bf16 (as for extract).")
def predict_cmd(images, model_path, fmt, out, force, batch_size, runtime, precision) -> None:
    """Class and probability for each image file (folders are searched); unreadable files are listed."""
    from pipeline.deploy.predict import format_result, is_prediction_file, predict

    if out:
        from pipeline.core.safety import guard_user_file

        guard_user_file(out, "a prediction file", is_prediction_file, force)
    result = predict(model_path, list(images), batch_size=batch_size, runtime=runtime, precision=precision)
    text = format_result(result, fmt)
    if out:
        from pipeline.core.util import atomic_write_text

        atomic_write_text(out, text)
        click.echo(f"{out}: {len(result.rows)} predicted, {len(result.failed)} unreadable")
    else:
        click.echo(text, nl=False)
    for f in result.failed:
        click.echo(f"tlpipe: warning: unreadable {f['path']}: {f['reason']}", err=True)


@cli.command("evaluate")
@click.option("--model", "model_path", type=click.Path(path_type=Path), required=True,
              help="A model written by 'tlpipe export'.")
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="A folder with one subfolder per class (named as the model's classes), "
                   "or with train/ val/ test/ subfolders holding them.")
@click.option("--split", default=None,
              help="train, val or test, for a folder with split subfolders [default: test, else val].")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Also write metrics.json, evaluation.json, mistakes.csv and figures/confusion.png here "
                   "(an earlier evaluation there is replaced; files of those names made otherwise only with --force).")
@click.option("--force", is_flag=True, help="Replace files in --out that tlpipe evaluate did not write.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--runtime", default="auto", show_default=True, help="auto | keras | openvino (as for predict).")
@click.option("--precision", default="auto", show_default=True, help="auto | f32 | bf16 (as for predict).")
def evaluate_cmd(model_path, data, split, out, force, fmt, batch_size, runtime, precision) -> None:
    """Score a model on labelled images: accuracy, balanced accuracy, log loss, confusion matrix,
    per-class precision and recall, and the mistakes (most confident first)."""
    from pipeline.deploy.evaluate import EvaluateConfig, evaluate_model, format_result

    res = evaluate_model(EvaluateConfig(model=model_path, data=data, split=split, out=out, batch_size=batch_size,
                                        force=force, runtime=runtime, precision=precision))
    click.echo(format_result(res, fmt), nl=False)
    if fmt == "json":
        for f in res.failed:
            click.echo(f"tlpipe: warning: unreadable {f['path']}: {f['reason']}", err=True)


@cli.command("learning-curve")
@click.option("--features", "features", multiple=True, required=True, help="Features file (repeat to fuse).")
@click.option("--head", default="logistic", show_default=True, help="logistic, dense, svm, rbf-svm or knn.")
@click.option("--sizes", default="50,100,500,1000,all", show_default=True,
              help="Training-set sizes (capped at the train split's size).")
@click.option("--seeds", type=click.IntRange(1), default=3, show_default=True,
              help="Subsamples per size (all of train is one sample: fitted once).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output CSV [default: CACHE/learning_curves/FEATURES-HEAD.csv]; a JSON summary and a PNG "
                   "figure go beside it.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=Path("cache"), show_default=True)
@click.option("--force", is_flag=True,
              help="Replace an --out CSV, JSON or PNG that tlpipe learning-curve did not write.")
def learning_curve_cmd(features, head, sizes, seeds, out, cache_dir, force) -> None:
    """Validation accuracy against the number of training images (stratified subsamples)."""
    from pipeline.stage2.learning_curve import CurveConfig, format_summary, learning_curve

    path = learning_curve(CurveConfig(features=list(features), head=head, sizes=sizes, seeds=seeds, out=out,
                                      cache_dir=cache_dir, force=force))
    click.echo(format_summary(path))


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="tlpipe")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
