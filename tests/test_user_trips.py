"""What a new user tripped on, following the README offline: each mistake is one true line, exit 2."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from conftest import write_image
from pipeline.cli import cli
from pipeline.core.errors import UsageError


def _run(args):
    return CliRunner().invoke(cli, args)


def test_a_wrong_option_before_the_command_is_one_line_exit_2():
    r = _run(["--cache-dir", "x", "bases"])
    assert r.exit_code == 2
    (line,) = r.output.strip().splitlines()
    assert line.startswith("tlpipe: error: No such option '--cache-dir'.")
    assert "put it after the command, e.g. tlpipe extract --cache-dir" in line
    r = _run(["--verbos", "bases"])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        "tlpipe: error: No such option '--verbos'. (Did you mean one of: '--verbose', '--version'?) "
        "(see 'tlpipe --help')"]


@pytest.mark.parametrize("loose", [0, 2])
def test_a_data_folder_without_class_subfolders_is_a_usage_error(tmp_path, loose):
    """extract and evaluate: no class subfolder (empty, or images directly in it) is exit 2 with the hint."""
    from pipeline.deploy.evaluate import labelled_files

    data = tmp_path / "data"
    data.mkdir()
    for i in range(loose):
        write_image(data / f"{i}.png", i)
    r = _run(["extract", "--base", "mobilenet_0.25", "--data", str(data), "--weights", "none",
              "--out", str(tmp_path / "f.h5")])
    assert r.exit_code == 2, r.output
    assert "(images must sit in one subfolder per class" in r.output and len(r.output.strip().splitlines()) == 1
    assert (f"{loose} image(s) sit directly in it" in r.output) == bool(loose)
    with pytest.raises(UsageError, match=r"images must sit in one subfolder per class"):
        labelled_files(data)


def test_a_weights_folder_without_the_base_names_the_bases_it_has(tmp_path, monkeypatch):
    """README's offline DVC line with the default bases: the error names the bases the folder does have
    weights for, and under DVC how to pick them."""
    from pipeline.nets.backbones import get_backbone
    from pipeline.nets.weights import parse_weights

    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "mobilenet_0.75_224_imagenet_notop.weights.h5").write_bytes(b"")  # found by name
    monkeypatch.delenv("DVC_STAGE", raising=False)
    with pytest.raises(UsageError, match=r"no weights for vgg16 in .*; it has weights for mobilenet_0.75 "
                                         r"\(--base mobilenet_0.75\)"):
        parse_weights(str(folder), get_backbone("vgg16"))
    monkeypatch.setenv("DVC_STAGE", "extract@vgg16")
    with pytest.raises(UsageError, match=r"dvc exp run -S 'extract.bases=\[mobilenet_0.75\]'"):
        parse_weights(str(folder), get_backbone("vgg16"))


def test_predict_on_a_head_folder_says_to_export_it_first(tmp_path):
    from pipeline.deploy.predict import check_model_path

    head = tmp_path / "vgg16-logistic"
    (head / "model").mkdir(parents=True)
    (head / "model" / "head.json").write_text("{}")
    with pytest.raises(UsageError, match=r"is a head folder: run 'tlpipe export --head .*vgg16-logistic --out "
                                         r"vgg16-logistic.keras' first"):
        check_model_path(head)


def test_every_docs_reference_in_the_package_exists():
    """No message points to a README section that does not exist: messages name docs/guide pages,
    and each page (and its named section, where one follows) is there."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = "\n".join(p.read_text() for p in sorted((root / "pipeline").rglob("*.py")))
    assert "README:" not in text and "the README (" not in text
    refs = set(re.findall(r"(docs/guide/[\w-]+\.md)(?:, ([A-Z][\w ]+))?", text))
    assert refs
    for page, section in refs:
        assert (root / page).is_file(), page
        if section:
            assert re.search(rf"^#+ {re.escape(section)}", (root / page).read_text(), re.M), (page, section)


def test_typos_of_head_and_layers_keywords_suggest_the_keyword():
    """A mistyped `--head auto` or `--layers blocks` says what was meant (new-user trial)."""
    from pipeline.core.errors import UsageError
    from pipeline.heads.auto import get_any_head
    from pipeline.nets.depths import resolve_layers

    with pytest.raises(UsageError, match="did you mean auto"):
        get_any_head("atuo")
    with pytest.raises(UsageError, match="did you mean --layers blocks"):
        resolve_layers("mobilenet_0.75", "blokcs")
