"""The batch-size notebook runs from top to bottom on a tiny real sweep with its documented command,
`python -m pipeline.notebook SWEEP_DIR`, from the working directory, so that it never rots."""

import base64
import dataclasses
import os
import subprocess
import sys

import nbformat
import pytest

from pipeline import config as config_lib
from pipeline import notebook as notebook_lib
from pipeline import rundir
from pipeline.study import batch_sweep as sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "batch_size_study.ipynb")
# The plots the notebook shows, in its order (report.show).
SHOWN = ("grad_std", "steps_to_target", "throughput", "accuracy", "noise_scale", "bn_discrepancy", "tuning")


def _base64(path):
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode()


@pytest.mark.slow
def test_notebook_runs_on_a_tiny_sweep(tmp_path):
    out = str(tmp_path / "sweep")
    config = dataclasses.replace(config_lib.smoke(), export=False, dynamics=False, precise_bn_samples=64,
                                 target_accuracy=0.3)
    # 2000 examples: 31 steps at batch 64 and 15 at batch 128, each over 2 epochs of 20 and 10 steps.
    sweep.sweep(config, sweep.Spec(batches=(64, 128), seeds=(0,), budget=sweep.Budget("examples", 2000)), out)
    assert [rundir.read_summary(os.path.join(out, "runs", f"batch-b{b}-s0"))["steps"] for b in (64, 128)] == [31, 15]
    for batch in (64, 128):  # the instruments wrote what the report reads
        assert os.path.getsize(os.path.join(out, "runs", f"batch-b{batch}-s0", "grad_stats.jsonl")) > 0
        assert os.path.getsize(os.path.join(out, "runs", f"batch-b{batch}-s0", "bn_stats.json")) > 0

    # The documented command, from another folder than the repository root, with the sweep folder relative to it.
    env = {k: v for k, v in os.environ.items() if k not in ("BATCHSCOPE_SWEEP_DIR", "BATCHSCOPE_TF_LOGS")}
    result = subprocess.run([sys.executable, "-m", "pipeline.notebook", "sweep"], cwd=tmp_path, capture_output=True,
                            text=True, env=dict(env, PYTHONPATH=REPO), timeout=600)
    executed = os.path.join("sweep", "batch_size_study.ipynb")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"notebook: {executed}\n", ""), result.stderr
    notebook = nbformat.read(tmp_path / executed, as_version=4)

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert not [o for o in outputs if o.output_type == "stream" and o.name == "stderr"]  # no library warnings
    images = [o.data["image/png"] for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    texts = "".join(o.data.get("text/markdown", "") for o in outputs if o.output_type == "display_data")
    # Every plot the notebook shows is the sweep's own PNG, byte for byte, in the notebook's order; a plot the sweep
    # has no data for (tuning: this sweep has no tuner) is a note instead.
    written = [name for name in SHOWN if os.path.exists(os.path.join(out, f"{name}.png"))]
    assert written == [name for name in SHOWN if name != "tuning"]
    assert images == [_base64(os.path.join(out, f"{name}.png")) for name in written]
    assert "*(no tuning plot: this sweep has no data for it)*" in texts
    assert "| batch | 64 |" in texts and "| batch | 128 |" in texts
    # Headings ask; the generated answers say what two batch sizes can and cannot show.
    headings = [line for cell in notebook.cells if cell.cell_type == "markdown" for line in cell.source.splitlines()
                if line.startswith("## ") and line != "## All findings"]
    assert len(headings) >= 8 and all(heading.endswith("?") or "?" in heading for heading in headings)
    assert ("Not enough data: the gradient's standard deviation was measured at 2 batch size(s); a fitted slope "
            "needs 3.") in texts
    assert "The fit S(B) = S_min (1 + B_crit / B) is not determined" in texts
    assert os.path.exists(os.path.join(out, "report.md"))
    # The notebook leaves the committed file untouched: no outputs are saved back.
    assert all(not cell.get("outputs") for cell in nbformat.read(NOTEBOOK, as_version=4).cells
               if cell.cell_type == "code")


def test_notebook_command_names_the_missing_package_and_the_extra(monkeypatch, capsys, tmp_path):
    real = notebook_lib.importlib.util.find_spec
    monkeypatch.setattr(notebook_lib.importlib.util, "find_spec",
                        lambda name, *args: None if name == "nbclient" else real(name, *args))
    assert notebook_lib.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == ('error: nbclient is not installed; the notebook extra installs it: '
                                       'python -m pip install -e ".[notebook]"\n')


def test_notebook_command_refuses_a_folder_without_runs(capsys, tmp_path):
    assert notebook_lib.main([str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith(f"error: SWEEP_DIR: {tmp_path / 'nothing'} holds no runs;")
