"""The docs site builds with ``mkdocs build --strict`` and its references cannot drift from the code;
the README opens with the two commands and names only paths that exist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, subprocess_env

README = REPO / "README.md"
DOCS = REPO / "docs"
# `pipeline/stage1/runtime.py`, `pipeline/heads/` ... and dotted `pipeline.deploy.export.read_metadata`
PATH_RE = re.compile(r"`(pipeline/[\w/.]*|cli\.py|\.ci/run|dvc\.yaml|params\.yaml|mkdocs\.yml|benchmarks/[\w/.]+|tests/[\w/.]+)")
DOTTED_RE = re.compile(r"\bpipeline(?:\.\w+)+")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    for module in ("mkdocs", "material", "mkdocs_click", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason=f"{module} is not installed: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    env = subprocess_env()  # offline: any download a theme or plugin tried would go to a closed port
    env.update({k: "http://127.0.0.1:9" for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")})
    env.update(NO_PROXY="", no_proxy="", NO_MKDOCS_2_WARNING="1")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stdout}\n{r.stderr}"
    return out


def _ids(page: Path) -> set[str]:
    return set(re.findall(r'\bid="([^"]+)"', page.read_text(encoding="utf-8")))


def test_site_loads_nothing_from_the_network(site):
    remote = [f"{page.relative_to(site)}: {m}" for page in site.rglob("*.html")
              for m in re.findall(r'<(?:script|link|img)\b[^>]*\b(?:src|href)="(?:https?:)?//[^"]*"', page.read_text("utf-8"))]
    assert not remote, f"pages load remote resources (no CDN, no web fonts): {remote[:5]}"


def test_cli_reference_lists_every_command(site):
    from pipeline.cli import cli

    ids = _ids(site / "reference" / "cli" / "index.html")
    missing = [name for name in sorted(cli.commands) if f"tlpipe-{name}" not in ids]
    assert cli.commands and not missing, f"commands missing from the CLI reference: {missing}"
    # the options come from click too: every option of extract is on the page
    text = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    options = [o for p in cli.commands["extract"].params for o in p.opts if o.startswith("--")]
    assert options and not [o for o in options if o not in text]


def test_api_reference_documents_every_public_name(site):
    import pipeline

    ids = _ids(site / "reference" / "api" / "index.html")
    missing = []
    for name in pipeline.__all__:
        if any(i.endswith(f".{name}") for i in ids):
            continue
        target = getattr(pipeline, name)  # an alias (export -> export_model) is documented by its own name
        if not any(i.endswith(f".{target.__name__}") for i in ids):
            missing.append(name)
    assert not missing, f"public names missing from the API reference: {missing}"


def test_readme_opens_with_the_two_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    block = lines[lines.index("```bash") + 1:][:2]
    assert lines.index("```bash") < 5, "the README must open with the two commands"
    assert block[0].startswith("python3 -m venv") and block[0].endswith("dvc repro")
    assert block[1].startswith("python3 -m venv") and block[1].endswith("python -m pytest")


def _named_paths(text: str) -> list[str]:
    return [m.rstrip(".") for m in PATH_RE.findall(text)]


def _missing_dotted(text: str) -> list[str]:
    """Dotted names ``pipeline.a.b.c`` whose module does not exist or does not mention the attribute."""
    missing = []
    for dotted in set(DOTTED_RE.findall(text)):
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):
            base = REPO.joinpath(*parts[:n])
            module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
            if module.is_file():
                rest = parts[n:]
                if rest and not re.search(rf"\b{rest[0]}\b", module.read_text(encoding="utf-8")):
                    missing.append(dotted)
                break
        else:
            missing.append(dotted)
    return sorted(missing)


@pytest.mark.parametrize("doc", ["README.md", *sorted(str(p.relative_to(REPO)) for p in DOCS.rglob("*.md"))])
def test_named_paths_exist(doc):
    text = (REPO / doc).read_text(encoding="utf-8")
    paths = [p for p in _named_paths(text) if not (REPO / p).exists() and not (REPO / "pipeline" / p).exists()]
    assert not paths, f"{doc} names paths that do not exist: {paths}"
    assert not _missing_dotted(text), f"{doc} names modules or functions that do not exist: {_missing_dotted(text)}"
