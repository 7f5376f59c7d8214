"""Data parallelism: TF_CONFIG, the chief, the Keras fixes' version gate, exact global batches over replicas.

The training tests start fresh processes (logical devices and the multi-worker strategy must be set up before
TensorFlow initializes) and compare every variable of the final checkpoint, optimizer state included, with a
one-device run of the same seed and global batch: the largest absolute difference must stay below TOLERANCE.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import tensorflow as tf

from pipeline import config as config_lib
from pipeline.config import InputError
from pipeline.training import distribute, execution, keras_compat

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Float32 sums of the per-replica gradients differ from the one-device sum in the last bits; over the few steps
# trained here the variables stay within this absolute difference (measured: ~1e-7 after 8 steps).
TOLERANCE = 1e-5
# A run small enough for several processes on two cores: BN-free CNN, 8 steps of global batch 32 per epoch.
RUN_FLAGS = ["--model", "cnn", "--batch", "32", "--lr", "0.02", "--verbose", "0",
             "--precise-bn-samples", "0", "--grad-stats-every", "0", "--bn-stats-every", "0", "--no-dynamics",
             "--no-export", "--seed", "3"]
# Seconds within which a worker whose peer was killed must end: the collective timeout (measured here: 16 s).
LOST_WORKER_BOUND_S = distribute.COLLECTIVE_TIMEOUT_S


def test_keras_compat_matches_the_patched_keras():
    # Fails when a new Keras changes the two patched functions: re-check keras-team/keras#20585, then update
    # or drop pipeline/training/keras_compat.py.
    import keras

    assert keras.__version__ == keras_compat.PATCHED_KERAS
    assert keras_compat.source_hashes() == keras_compat.SOURCE_SHA256


def test_keras_compat_refuses_other_sources(monkeypatch):
    monkeypatch.setitem(keras_compat.SOURCE_SHA256, "reduce_per_replica", "0" * 64)
    with pytest.raises(RuntimeError, match="refusing to patch"):
        keras_compat.check_patchable()


@pytest.mark.parametrize("raw, message", [
    ("{not json", "not valid JSON"),
    ('{"cluster": {"worker": ["a:1"]}}', "needs"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", "index": 0}}', "needs"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}', "index 1"),
])
def test_bad_tf_config_is_one_line(monkeypatch, raw, message):
    monkeypatch.setenv("TF_CONFIG", raw)
    with pytest.raises(InputError, match=message) as error:
        distribute.read_tf_config()
    assert str(error.value).startswith("TF_CONFIG: ") and "\n" not in str(error.value)


def test_mirrored_devices_are_the_first_replicas_gpus_or_cpus():
    gpus, cpus = ["/GPU:0", "/GPU:1", "/GPU:2"], ["/CPU:0", "/CPU:1"]
    assert distribute.mirrored_devices(2, gpus, cpus) == ["/GPU:0", "/GPU:1"]
    assert distribute.mirrored_devices(0, gpus, cpus) == gpus and distribute.mirrored_devices(0, [], cpus) == cpus
    assert distribute.mirrored_devices(2, [], cpus) == cpus
    with pytest.raises(InputError, match=r"^--replicas: 4 replicas need 4 devices; this process has 3 GPUs$"):
        distribute.mirrored_devices(4, gpus, cpus)
    with pytest.raises(InputError, match=r"^--replicas: 3 replicas .* 2 CPU devices \(split the CPU with --logical"):
        distribute.mirrored_devices(3, [], cpus)


def test_chief_is_the_chief_task_or_worker_zero():
    workers = {"worker": ["a:1", "b:1"]}
    assert distribute.is_chief(None)
    assert distribute.is_chief({"cluster": workers, "task": {"type": "worker", "index": 0}})
    assert not distribute.is_chief({"cluster": workers, "task": {"type": "worker", "index": 1}})
    with_chief = {"chief": ["c:1"], **workers}
    assert distribute.is_chief({"cluster": with_chief, "task": {"type": "chief", "index": 0}})
    assert not distribute.is_chief({"cluster": with_chief, "task": {"type": "worker", "index": 0}})


@pytest.mark.parametrize("pipelines, replicas", [(1, 1), (2, 2), (2, 4), (4, 4)])
def test_split_global_batches_recovers_every_global_batch(pipelines, replicas):
    # Brute force: the slices of all pipelines, taken in replica order, concatenate to the global batches.
    x = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)
    y = np.arange(6 * 8, dtype=np.int32)
    order = np.random.default_rng(1).permutation(48)
    global_batches = tf.data.Dataset.from_tensor_slices((x[order], y[order])).batch(8)
    expected = [(bx.numpy(), by.numpy()) for bx, by in global_batches]
    per_pipeline = []
    for pipeline in range(pipelines):
        context = tf.distribute.InputContext(pipelines, pipeline, replicas)
        per_pipeline.append([(bx.numpy(), by.numpy()) for bx, by in
                             distribute.split_global_batches(global_batches, context, 8)])
    local = replicas // pipelines
    for step, (bx, by) in enumerate(expected):
        slices = [per_pipeline[p][step * local + r] for p in range(pipelines) for r in range(local)]
        np.testing.assert_array_equal(np.concatenate([s[0] for s in slices]), bx)
        np.testing.assert_array_equal(np.concatenate([s[1] for s in slices]), by)
        assert all(len(s[1]) == 8 // replicas for s in slices)


def _train(args, env=None) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "pipeline.train", *RUN_FLAGS, *args], cwd=ROOT, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _workers(run_dirs, args, ports):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    return [_train(["--strategy", "multiworker", "--run-dir", run_dir, *args],
                   env={"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})})
            for i, run_dir in enumerate(run_dirs)]


def _finish(process, timeout=300):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def _checkpoint(run_dir: str) -> dict[str, np.ndarray]:
    """Every variable (model and optimizer) of the run's newest checkpoint, by its path in the file.

    Paths name layers by class (layers/batch_normalization_1/...); ghost batch norm's are renamed to batch
    norm's so that the two models' files compare variable by variable.
    """
    files = glob.glob(os.path.join(run_dir, "checkpoints", "**", "*.weights.h5"), recursive=True)
    values = {}
    with h5py.File(max(files, key=os.path.getmtime), "r") as f:
        f.visititems(lambda name, item: values.__setitem__(name.replace("ghost_batch_norm", "batch_norm"), item[()])
                     if isinstance(item, h5py.Dataset) else None)
    return values


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and len(a) > 10
    difference = max(float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)))) for k in a)
    print(f"largest absolute difference of {len(a)} variables: {difference:.2e}")
    return difference


STEPS = ["--epochs", "2", "--max-steps", "16"]  # two epochs of 8 steps: a checkpoint, a new epoch's order
GRAD_STATS = ["--grad-stats-every", "4"]  # a record of the replicas' gradient statistics every 4 steps
# One-device references, each a norm flag set: BN-free; BatchNorm over the global batch of 32; ghost BatchNorm over
# virtual batches of 16, which are exactly what each of two replicas normalizes over with per-replica BatchNorm.
REFERENCES = {"none": ["--norm", "none"], "batch": ["--norm", "batch"],
              "ghost16": ["--norm", "ghost", "--ghost-batch", "16"]}


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """One-device runs, started together at once and read when a test needs one: {name: (process, run_dir)}."""
    runs = {}
    for name, flags in REFERENCES.items():
        run_dir = str(tmp_path_factory.mktemp(name) / "run")
        runs[name] = _train(["--strategy", "one", "--run-dir", run_dir, *flags, *STEPS]), run_dir
    yield runs
    for process, _ in runs.values():
        if process.returncode is None:
            process.kill()
            process.communicate()


def _reference(one_device, name: str) -> dict:
    process, run_dir = one_device[name]
    if process.returncode is None:
        code, _, err = _finish(process)
        assert code == 0, err[-2000:]
    return _checkpoint(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("norm, reference", [("none", "none"), ("syncbatch", "batch"), ("batch", "ghost16")])
def test_mirrored_over_two_logical_cpus_equals_one_device(one_device, tmp_path, norm, reference):
    # BN-free: the same weights. syncbatch normalizes over the global batch as one device does; per-replica batch
    # norm is ghost batch norm over the replicas' slices, moving statistics included (averaged at epoch ends).
    # BN-free, with the gradient statistics from the replicas (callbacks/replica_norms.py): the same weights.
    run_dir = str(tmp_path / "run")
    statistics = GRAD_STATS if norm == "none" else []
    code, _, err = _finish(_train(["--strategy", "mirrored", "--logical-cpus", "2", "--run-dir", run_dir,
                                   "--norm", norm, *STEPS, *statistics]))
    assert code == 0, err[-2000:]
    if statistics:
        _check_replica_records(run_dir)
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert (summary["strategy"], summary["replicas"], summary["per_replica_batch"]) == ("mirrored", 2, 16)
    assert summary["steps"] == 16
    assert summary["bn_batch"] == {"none": 0, "syncbatch": 32, "batch": 16}[norm]
    assert _max_difference(_checkpoint(run_dir), _reference(one_device, reference)) < TOLERANCE


@pytest.mark.slow
def test_two_workers_equal_one_device_and_only_the_chief_writes(one_device, tmp_path, free_ports):
    # The second worker is given a run directory of its own: it must stay untouched (it only reads on --resume).
    chief_dir, other_dir = str(tmp_path / "run"), str(tmp_path / "other")
    workers = _workers([chief_dir, other_dir], ["--norm", "none", *STEPS, *GRAD_STATS], free_ports(2))
    results = [_finish(worker) for worker in workers]
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    assert not os.path.exists(other_dir)
    with open(os.path.join(chief_dir, "config.json")) as f:
        assert json.load(f)["parallel"] == {"strategy": "multiworker", "replicas": 2, "workers": 2,
                                            "per_replica_batch": 16, "steps_per_execution": 1,
                                            "intra_op_threads": execution.resolved_threads(config_lib.Config())}
    assert _max_difference(_checkpoint(chief_dir), _reference(one_device, "none")) < TOLERANCE
    _check_replica_records(chief_dir)


def _check_replica_records(run_dir: str) -> None:
    """The chief's grad_stats.jsonl holds a record from the replicas every 4 steps, and the epoch logs its values
    but not the training step's per-step norms."""
    with open(os.path.join(run_dir, "grad_stats.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [4, 8, 12, 16]
    assert all((r["source"], r["replicas"], r["micro_batch_size"], r["steps_pooled"]) == ("replicas", 2, 16, 4)
               and r["grad/trace_cov"] > 0 for r in records)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        epochs = [json.loads(line) for line in f]
    assert epochs[-1]["grad/step"] == 16 and epochs[-1]["grad/trace_cov"] == records[-1]["grad/trace_cov"]
    assert not any(key in e for e in epochs for key in ("grad/replica_norm_sq", "grad/global_norm_sq"))


@pytest.mark.slow
def test_a_killed_worker_ends_the_other_and_both_resume(tmp_path, free_ports):
    run_dir = str(tmp_path / "run")
    ports = free_ports(2)
    # A constant schedule, so that the rerun may stop at fewer epochs (a cosine schedule spans all epochs).
    chief, other = _workers([run_dir, run_dir], ["--norm", "none", "--schedule", "constant", "--epochs", "40"], ports)
    state = os.path.join(run_dir, "checkpoints")
    deadline = time.monotonic() + 300
    while not (os.path.isdir(state) and os.listdir(state)) and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(1)
    other.send_signal(signal.SIGKILL)
    other.communicate()
    killed = time.monotonic()
    code, _, err = _finish(chief, timeout=LOST_WORKER_BOUND_S)
    assert time.monotonic() - killed < LOST_WORKER_BOUND_S
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("run failed: lost contact with another worker")
    with open(os.path.join(run_dir, "summary.json")) as f:
        failed = json.load(f)
    assert failed["status"] == "failed" and 0 < failed["epochs"] < 40

    # Both again with --resume (fewer epochs in all, so that the test ends soon): they finish the run.
    workers = _workers([run_dir, run_dir], ["--norm", "none", "--schedule", "constant", "--epochs",
                                            str(failed["epochs"] + 1), "--resume"], free_ports(2))
    results = [_finish(worker) for worker in workers]
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    with open(os.path.join(run_dir, "summary.json")) as f:
        resumed = json.load(f)
    assert resumed["status"] == "completed" and resumed["epochs"] == failed["epochs"] + 1


# Streamed input (--input stream) from a folder of tiny images: 68 training examples, 2 epochs of 4 steps of 16.
# 8 validation examples: under mirrored, Keras 3.15 failed on 9 (AddN of the replicas' halves of 5 and 4 examples).
STREAM = ["--norm", "none", "--input", "stream", "--batch", "16", "--epochs", "2"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, write_image_folder):
    """folder:PATH of 3 classes of 32 random 8x8 colour PNG images (20 held out for test, 8 for validation)."""
    return write_image_folder(tmp_path_factory.mktemp("images"), 32, (8, 8, 3), seed=5)


def _streamed_config(folder: str, run_dir: str):
    from pipeline import flags

    config, _ = flags.parse([*RUN_FLAGS, *STREAM, "--dataset", folder, "--strategy", "one", "--run-dir", run_dir],
                            description="")
    return config


@pytest.mark.slow
def test_mirrored_streaming_equals_one_device_streaming(image_folder, tmp_path):
    # Under mirrored the stream's global batches are cut into the replicas' slices, as in-memory ones are.
    from pipeline import train as train_lib

    mirrored = _train(["--strategy", "mirrored", "--logical-cpus", "2", "--dataset", image_folder,
                       "--run-dir", str(tmp_path / "mirrored"), *STREAM])
    one = train_lib.train(_streamed_config(image_folder, str(tmp_path / "one")))  # meanwhile, in this process
    code, _, err = _finish(mirrored)
    assert code == 0, err[-2000:]
    assert one.status == "completed" and one.steps == 2 * (68 // 16)
    assert _max_difference(_checkpoint(str(tmp_path / "mirrored")), _checkpoint(one.run_dir)) < TOLERANCE


@pytest.mark.slow
def test_two_streaming_workers_train_on_both_shards(image_folder, tmp_path, free_ports):
    """Each worker fills its half of every global batch from its own files (pipeline/data/streamed.py), so the run
    equals one device trained on the concatenation of the two workers' per-replica batches, built here from
    StreamingData.train_dataset with each worker's InputContext. Both workers apply the all-reduced gradient of that
    global batch in every step, so matching the chief's checkpoint to it shows both shards were trained on by
    the same weights; the other worker keeps its checkpoints in a temporary folder of its own."""
    import keras

    from pipeline.data import loading
    from pipeline.training import checkpoint
    from pipeline.training import fit_loop

    chief_dir = str(tmp_path / "run")
    cache = ["--cache-dir", str(tmp_path / "cache")]  # each worker writes its own shard's cache
    workers = _workers([chief_dir, chief_dir], [*STREAM, "--dataset", image_folder, *cache], free_ports(2))

    config = _streamed_config(image_folder, str(tmp_path / "reference"))
    keras.utils.set_random_seed(config.seed)  # as pipeline.train does, before loading and building
    data = loading.load(config)
    model, _ = fit_loop.compiled_model(config, data)
    steps = data.num_train // config.batch

    def global_batches(epoch):
        shards = [data.train_dataset(config.batch, seed=config.seed, epoch=epoch,
                                     input_context=tf.distribute.InputContext(2, worker, 2)) for worker in (0, 1)]
        return tf.data.Dataset.zip(*shards).map(lambda a, b: (tf.concat([a[0], b[0]], 0), tf.concat([a[1], b[1]], 0)))

    model.fit(global_batches(0).concatenate(global_batches(1)), epochs=2, steps_per_epoch=steps, shuffle=False,
              verbose=0)
    checkpoint.save(model, os.path.join(config.run_dir, "checkpoints"), 2, 2 * steps)

    results = [_finish(worker) for worker in workers]
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    with open(os.path.join(chief_dir, "summary.json")) as f:
        summary = json.load(f)
    assert (summary["strategy"], summary["workers"], summary["per_replica_batch"], summary["steps"]) == (
        "multiworker", 2, 8, 2 * steps)
    assert sorted(name.split("-")[1] for name in os.listdir(tmp_path / "cache") if name.startswith("train")
                  and name.endswith(".index")) == ["0of1", "0of2", "1of2"]  # 0of1: the statistics pass
    assert _max_difference(_checkpoint(chief_dir), _checkpoint(config.run_dir)) < TOLERANCE
