"""The house rules that an AST walk checks (CI also runs `lint-imports` for layers and cycles):

* no module of ``pipeline`` (and no test) imports another module's private name (``_x``; dunders such
  as ``__version__`` are not private);
* no function in ``pipeline/`` is longer than 60 lines.

``ALLOWED_*`` list the known exceptions in stage one and the store, which the stage1 rebuild removes.
The lists may only shrink: an entry that no longer breaks the rule fails the test, so that it is
deleted from the list when its code is fixed.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60

# (importing file, imported module, name): removed when the stage1 runner lands
ALLOWED_PRIVATE_IMPORTS: set[tuple[str, str, str]] = set()
# (file, function): removed when the stage1 runner lands
ALLOWED_LONG_FUNCTIONS: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_module(node: ast.ImportFrom, path: Path) -> str:
    """The absolute name of the module an ``ImportFrom`` reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def private_imports(source: str, path: Path) -> set[tuple[str, str, str]]:
    """(file, module, name) for every private name imported from another pipeline module."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom):
            continue
        module = _imported_module(node, path)
        if not (module == "pipeline" or module.startswith("pipeline.")) or module == _module_name(path):
            continue
        for alias in node.names:
            if alias.name.startswith("_") and not (alias.name.startswith("__") and alias.name.endswith("__")):
                found.add((path.relative_to(ROOT).as_posix(), module, alias.name))
    return found


def long_functions(source: str, path: Path) -> dict[tuple[str, str], int]:
    """(file, function) -> lines, for every function or method longer than ``MAX_LINES``."""
    out = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_LINES:
                out[(path.relative_to(ROOT).as_posix(), node.name)] = lines
    return out


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_no_private_name_is_imported_across_modules():
    found = set()
    for path in _files("pipeline") + _files("tests"):
        found |= private_imports(path.read_text(encoding="utf-8"), path)
    new = sorted(found - ALLOWED_PRIVATE_IMPORTS)
    assert not new, f"private names imported from other modules (make them public or move the code): {new}"
    fixed = sorted(ALLOWED_PRIVATE_IMPORTS - found)
    assert not fixed, f"fixed: delete these from ALLOWED_PRIVATE_IMPORTS: {fixed}"


def test_no_function_is_longer_than_60_lines():
    found: dict[tuple[str, str], int] = {}
    for path in _files("pipeline"):
        found.update(long_functions(path.read_text(encoding="utf-8"), path))
    new = {k: v for k, v in sorted(found.items()) if k not in ALLOWED_LONG_FUNCTIONS}
    assert not new, f"functions over {MAX_LINES} lines (split them into readable steps): {new}"
    fixed = sorted(ALLOWED_LONG_FUNCTIONS - set(found))
    assert not fixed, f"fixed: delete these from ALLOWED_LONG_FUNCTIONS: {fixed}"


def test_the_checks_find_what_they_look_for():
    path = ROOT / "pipeline" / "stage3" / "example.py"
    source = ("from pipeline.deploy.export import _secret, public\n"
              "from pipeline import __version__\n"
              "from .finetune import _relative\n"
              "from pipeline.stage3.example import _own\n"
              "def f():\n" + "    x = 1\n" * MAX_LINES)
    assert private_imports(source, path) == {
        ("pipeline/stage3/example.py", "pipeline.deploy.export", "_secret"),
        ("pipeline/stage3/example.py", "pipeline.stage3.finetune", "_relative")}
    assert long_functions(source, path) == {("pipeline/stage3/example.py", "f"): MAX_LINES + 1}
    assert long_functions("def g():\n" + "    x = 1\n" * (MAX_LINES - 1), path) == {}


def test_import_contracts_are_kept():
    """The layers and no-cycle contracts of pyproject.toml (what CI runs as ``lint-imports``)."""
    pytest.importorskip("importlinter")
    r = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                        "lint_imports_command()"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
