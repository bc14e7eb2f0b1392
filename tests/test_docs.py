"""The documentation works: every ```python block of README.md and docs/**/*.md runs, and
(when mkdocs is installed: ``pip install -e '.[docs]'``) ``mkdocs build --strict`` passes.

Each file's blocks run in order in one namespace (later blocks use earlier names), from a
temporary working directory.  docs/validation/ (the generated report) is not executed.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)


def _doc_files() -> list[Path]:
    files = [ROOT / "README.md"]
    files += sorted(p for p in DOCS.rglob("*.md") if "validation" not in p.relative_to(DOCS).parts[:1])
    return [p for p in files if p.exists()]


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block in ``path``."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in _FENCE.finditer(text)]


FILES = [p for p in _doc_files() if python_blocks(p)]


def test_docs_have_examples():
    assert sum(len(python_blocks(p)) for p in FILES) >= 10


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_code_blocks_run(path: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # a real module, so that dataclasses and pickling in the examples can find it
    module = types.ModuleType(f"_docs_{path.stem.replace('-', '_')}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    # solvers registered by the examples (extending.md) must not leak into other tests
    import solvers._registry as registry
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    namespace = module.__dict__
    for line, code in python_blocks(path):
        try:
            exec(compile(code, f"{path.relative_to(ROOT)}:{line}", "exec"), namespace)
        except Exception as err:  # pragma: no cover - the message is the point
            raise AssertionError(f"code block at {path.relative_to(ROOT)} line {line} failed: {err!r}") from err


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    pytest.importorskip("material")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert (tmp_path / "site" / "api" / "index.html").exists()
