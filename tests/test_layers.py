"""The import contracts of .importlinter: the allowed directions hold, and a wrong-way import breaks them."""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("pipeline", "models", "callbacks")
LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename='.importlinter', no_cache=True, no_logo=True))")


def _lint(root):
    """lint-imports on the packages under `root`, in a process of its own (its graph is built from `root` alone)."""
    env = dict(os.environ, PYTHONPATH=root)
    return subprocess.run([sys.executable, "-c", LINT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def _copy(tmp_path):
    for package in PACKAGES:
        shutil.copytree(os.path.join(REPO, package), tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(REPO, ".importlinter"), tmp_path)
    return tmp_path


def test_imports_follow_the_contracts(monkeypatch):
    from importlinter.cli import lint_imports

    monkeypatch.chdir(REPO)
    assert lint_imports(config_filename=".importlinter", no_cache=True, no_logo=True) == 0


@pytest.mark.slow
@pytest.mark.parametrize("module, line, message", [
    ("pipeline/rundir.py", "from pipeline import train", "pipeline.rundir is not allowed to import pipeline.train"),
    ("models/cnn.py", "from pipeline import config", "models.cnn -> pipeline.config"),
])
def test_a_wrong_way_import_breaks_a_contract(tmp_path, module, line, message):
    root = _copy(tmp_path)
    assert _lint(str(root)).returncode == 0  # the copy as it is keeps every contract
    with open(root / module, "a", encoding="utf-8") as f:
        f.write(f"\n{line}  # the wrong way\n")
    result = _lint(str(root))
    assert result.returncode == 1 and message in result.stdout, result.stdout + result.stderr
