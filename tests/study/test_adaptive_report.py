"""--batch adaptive in a sweep: its run configs, examples to target by hand, and the report's section and plot."""

import json
import os

from pipeline import config as config_lib
from pipeline import rundir
from pipeline.study import adaptive_report
from pipeline.study import batch_sweep as sweep

NUM_TRAIN = 1293  # digits


def test_a_sweep_adds_one_adaptive_run_per_seed_at_the_base_batch():
    assert sweep._batches("64,adaptive,32") == (config_lib.ADAPTIVE, 32, 64)
    preset = config_lib.batch_study()  # lr 0.05 at batch 32, scaled linearly for the fixed batches
    runs = sweep.run_configs(preset, sweep.Spec(batches=(0, 64), seeds=(0, 1)), NUM_TRAIN)
    adaptive = [c for c in runs if c.adaptive_batch]
    assert len(adaptive) == 2 and all(c.lr_scaling == "none" and c.lr == 0.05 for c in adaptive)
    # Its instruments are spread over the base batch's steps: 12 epochs of 1293 // 32 = 40 steps, 16 measurements.
    assert adaptive[0].grad_stats_every == 12 * 40 // 16
    assert [c.lr_scaling for c in runs if not c.adaptive_batch] == ["linear", "linear"]
    assert sweep.run_name("batch", config_lib.ADAPTIVE, 1) == "batch-badaptive-s1"


def test_examples_until_a_step_count_each_epoch_at_its_batch():
    history = [{"epoch": 0, "step": 40, "batch_size": 32}, {"epoch": 1, "step": 60, "batch_size": 64},
               {"epoch": 2, "step": 70, "batch_size": 128}]
    assert adaptive_report.examples_until(history, 50) == 40 * 32 + 10 * 64
    assert adaptive_report.examples_until(history, 70) == 40 * 32 + 20 * 64 + 10 * 128
    assert adaptive_report.examples_until(history, 12) == 12 * 32
    assert adaptive_report.examples_until(history, None) is None


def write_adaptive_run(run_dir, steps_to_target, time_to_target):
    os.makedirs(run_dir)
    config = config_lib.to_dict(config_lib.Config(batch=config_lib.ADAPTIVE, batch_policy="norm-test"))
    rundir.write_json_atomic(os.path.join(run_dir, "config.json"), {"config": config})
    rundir.write_json_atomic(os.path.join(run_dir, "summary.json"), {
        "status": "completed", "steps": 70, "test_accuracy": 0.97, "steps_to_target": steps_to_target,
        "time_to_target_s": time_to_target, "wall_time_s": 30.0})
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for epoch, (step, batch) in enumerate([(40, 32), (60, 64), (70, 128)]):
            f.write(json.dumps({"epoch": epoch, "step": step, "batch_size": batch}) + "\n")
    with open(os.path.join(run_dir, "batch_decisions.jsonl"), "w") as f:
        for step, old, new in [(40, 32, 64), (60, 64, 128)]:
            f.write(json.dumps({"step": step, "old_batch": old, "new_batch": new, "changed": True}) + "\n")
    with open(os.path.join(run_dir, "grad_stats.jsonl"), "w") as f:
        for step, value in [(10, 50.0), (40, 120.0), (60, None)]:
            f.write(json.dumps({"step": step, "grad/noise_scale": value, "grad/noise_scale_lo": 30.0,
                                "grad/noise_scale_hi": None if value is None else 2 * value}) + "\n")


def stat(mean):
    return {"mean": mean}


def test_section_puts_each_adaptive_run_beside_the_best_fixed_batches(tmp_path):
    run_dir = str(tmp_path / "runs" / "batch-badaptive-s0")
    write_adaptive_run(run_dir, steps_to_target=50, time_to_target=6.0)
    assert adaptive_report.is_adaptive(run_dir)
    groups = [{"norm": "batch", "batch": 32, "time_to_target_s": stat(12.0), "steps_to_target": stat(60.0)},
              {"norm": "batch", "batch": 64, "time_to_target_s": stat(8.0), "steps_to_target": stat(45.0)},
              {"norm": "batch", "batch": 128, "time_to_target_s": stat(None), "steps_to_target": stat(None)}]
    section = adaptive_report.section([run_dir], groups)
    assert section["fastest_fixed"]["batch"] == 64  # 8 s
    assert section["fewest_examples_fixed"]["batch"] == 32  # 32 x 60 = 1920 examples against 64 x 45 = 2880
    run = section["runs"][0]
    assert run["batches"] == [(0, 32), (40, 64), (60, 128)] and run["changes"] == 2
    assert run["examples_to_target"] == 40 * 32 + 10 * 64
    text = adaptive_report.markdown(section, adaptive_report.plot(section, str(tmp_path)))
    row = [line for line in text.splitlines() if line.startswith("| batch-badaptive-s0")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:] == ["32@0, 64@40, 128@60", "50", "1920", "6.0", f"{6.0 / 8.0:.2f}x", f"{1920 / 1920:.2f}x",
                         "0.9700"]
    assert os.path.getsize(tmp_path / "adaptive_batch.png") > 0
    assert adaptive_report.section([], groups) is None
    assert not adaptive_report.is_adaptive(str(tmp_path))  # no config.json
