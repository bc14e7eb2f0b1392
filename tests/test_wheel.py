"""The built wheel stands alone: ``scoresde validate`` works after a non-editable install.

The test builds the wheel from a copy of the source (so the checkout gets no ``build/`` or
``*.egg-info``), installs it with ``--no-deps`` into a fresh virtual environment, and runs the
command from a directory outside the repository.  The fresh environment has no pip and no
dependencies of its own: a ``.pth`` file appends this interpreter's site-packages (torch, numpy,
...) to its path, after its own site-packages, so ``scoresde``, ``solvers`` and ``validation``
come from the wheel and everything else from here.  The environment this test runs in is only
read, never changed.

It fails if a package is left out of the wheel (``scoresde validate`` then cannot import the
suite), if the suite's recorded bounds (``validation/bounds.json``, package data) are missing
(the run then reports no bounds file), or if the installed code reads anything from the
checkout.
"""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600   # a hang guard only; the whole test takes seconds


def _run(cmd: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert res.returncode == 0, f"{cmd} exited {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


def _copy_source(dst: Path) -> None:
    """pyproject.toml, README.md and every top-level package (a folder with __init__.py)."""
    dst.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dst / name)
    for pkg in REPO.iterdir():
        if pkg.is_dir() and (pkg / "__init__.py").is_file() and pkg.name != "tests":
            shutil.copytree(pkg, dst / pkg.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _dependency_dirs() -> list[str]:
    """Where this interpreter finds torch and the other dependencies."""
    paths = sysconfig.get_paths()
    dirs = [paths["purelib"], paths["platlib"], *site.getsitepackages()]
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def test_validate_runs_from_the_installed_wheel(tmp_path):
    pytest.importorskip("setuptools", minversion="70.1")   # builds the wheel without isolation
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}

    src, dist, venv = tmp_path / "src", tmp_path / "dist", tmp_path / "venv"
    _copy_source(src)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "-w", dist, src], tmp_path, env)
    (wheel,) = dist.glob("scoresde-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert {"validation/suite.py", "validation/bounds.json", "solvers/__init__.py"} <= names

    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env)
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   tmp_path, env).stdout.strip()
    Path(purelib, "_scoresde_test_deps.pth").write_text("\n".join(_dependency_dirs()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index",
          wheel], tmp_path, env)

    where = _run([python, "-c", "import scoresde, solvers, validation; "
                  "print(scoresde.__file__, solvers.__file__, validation.__file__, sep='\\n')"],
                 tmp_path, env).stdout.split()
    for f in where:
        assert Path(f).resolve().is_relative_to(venv.resolve()), f"{f} is not from the installed wheel"

    out = tmp_path / "report"
    scoresde = python.with_name("scoresde.exe" if os.name == "nt" else "scoresde")
    run = _run([scoresde, "validate", "--quick", "--sections", "det", "--methods", "ddim",
                "--sdes", "vp", "--out", out, "--quiet"], tmp_path, env)
    assert "VERDICT: PASS" in run.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["bounds_file"] == "bounds.json"       # the recorded bounds shipped and were read
    assert results["deterministic"], "the det section produced no results"
