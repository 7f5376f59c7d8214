"""Data-parallel training on tf.distribute: devices, strategy, TF_CONFIG, the chief, and exact global batches."""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
import tempfile

from pipeline.config import Config, InputError

# Seconds a collective (the gradient all-reduce) waits for the other workers before it fails, so that a worker
# whose peer died ends with an error instead of waiting forever. Steps here take well under a second; the first
# one also waits for every worker to start and build its model, which can take a minute on a loaded machine.
COLLECTIVE_TIMEOUT_S = 120


@dataclasses.dataclass(frozen=True)
class Topology:
    """Where this process sits in a data-parallel run.

    replicas: model copies that each take a slice of every global batch (devices over all workers).
    workers: processes (hosts) taking part; worker_index is this one's task index among them.
    is_chief: whether this process writes the run directory (checkpoints, summaries, TensorBoard, export).
    """

    strategy: str  # one | mirrored | multiworker (auto resolved)
    replicas: int = 1
    workers: int = 1
    worker_index: int = 0
    is_chief: bool = True

    def per_replica_batch(self, global_batch: int) -> int:
        """Examples each replica computes per step: global_batch / replicas (checked to divide in validate)."""
        return global_batch // self.replicas


def read_tf_config() -> dict | None:
    """The parsed TF_CONFIG environment variable ({"cluster": {...}, "task": {"type", "index"}}), or None.

    Raises:
      InputError: TF_CONFIG is set but is not such a JSON object.
    """
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InputError(f"TF_CONFIG: not valid JSON ({e.msg}); see the README's 'Scaling out' example") from None
    task = value.get("task") if isinstance(value, dict) else None
    cluster = value.get("cluster") if isinstance(value, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict) or task.get("type") not in cluster:
        raise InputError('TF_CONFIG: needs {"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", '
                         '"index": I}} with the task type listed in the cluster')
    if not isinstance(task.get("index", 0), int) or not 0 <= task.get("index", 0) < len(cluster[task["type"]]):
        raise InputError(f"TF_CONFIG: task index {task.get('index')!r} is not in the cluster's {task['type']} list")
    return value


def is_chief(tf_config: dict | None) -> bool:
    """The chief is the "chief" task, or worker 0 when the cluster has no chief (TensorFlow's convention)."""
    if not tf_config:
        return True
    task_type, index = tf_config["task"]["type"], tf_config["task"].get("index", 0)
    return task_type == "chief" or (task_type == "worker" and index == 0 and "chief" not in tf_config["cluster"])


def resolve_strategy(config: Config, num_gpus: int) -> str:
    """auto -> mirrored when more than one GPU is visible, else one; other names stay."""
    if config.strategy == "auto":
        return "mirrored" if num_gpus > 1 else "one"
    return config.strategy


def configure_devices(config: Config) -> None:
    """Splits the CPU into config.logical_cpus logical devices; must run before TensorFlow initializes devices.

    Raises:
      InputError: TensorFlow's devices were already initialized in this process with another split.
    """
    if config.logical_cpus <= 1:
        return
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration()] * config.logical_cpus
    try:
        tf.config.set_logical_device_configuration(cpu, wanted)
    except RuntimeError:
        if len(tf.config.list_logical_devices("CPU")) != config.logical_cpus:
            raise InputError(f"--logical-cpus: TensorFlow's devices were already set up in this process with "
                             f"{len(tf.config.list_logical_devices('CPU'))} CPU devices; start a new process") from None


def mirrored_devices(replicas: int, gpus: list[str], cpus: list[str]) -> list[str]:
    """The devices that mirrored trains on: the first `replicas` GPUs, else logical CPUs (0: all of them).

    Raises:
      InputError: fewer devices than replicas.
    """
    devices = gpus or cpus
    if replicas > len(devices):
        kind = "GPUs" if gpus else "CPU devices (split the CPU with --logical-cpus)"
        raise InputError(f"--replicas: {replicas} replicas need {replicas} devices; this process has "
                         f"{len(devices)} {kind}")
    return devices[:replicas] if replicas else devices


def build_strategy(config: Config):
    """The tf.distribute strategy of config.strategy, and this process's Topology.

    one: TensorFlow's default strategy (one device; Keras runs exactly as without tf.distribute).
    mirrored: MirroredStrategy over all GPUs, or over the logical CPUs when there is no GPU.
    multiworker: MultiWorkerMirroredStrategy over the TF_CONFIG cluster (Keras 3.15.1 needs keras_compat).

    Raises:
      InputError: a strategy that this machine or environment cannot run.
    """
    import tensorflow as tf

    configure_devices(config)
    # Physical, not logical, devices: listing logical ones initializes TensorFlow's context, after which the
    # multi-worker strategy can no longer configure its collectives.
    name = resolve_strategy(config, len(tf.config.list_physical_devices("GPU")))
    tf_config = read_tf_config()
    if name == "one":
        return tf.distribute.get_strategy(), Topology("one")
    if name == "mirrored":
        devices = mirrored_devices(config.replicas, [d.name for d in tf.config.list_logical_devices("GPU")],
                                   [d.name for d in tf.config.list_logical_devices("CPU")])
        strategy = tf.distribute.MirroredStrategy(devices)
        return strategy, Topology("mirrored", replicas=strategy.num_replicas_in_sync)
    if tf_config is None:
        raise InputError("--strategy: multiworker needs the TF_CONFIG environment variable describing the cluster; "
                         "see the README's 'Scaling out' section")
    from pipeline.training import keras_compat

    try:
        keras_compat.patch()
    except RuntimeError as e:
        raise InputError(f"--strategy: {e}") from None
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=COLLECTIVE_TIMEOUT_S)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    resolver = strategy.cluster_resolver
    workers = len(tf_config["cluster"].get("worker", [])) + len(tf_config["cluster"].get("chief", []))
    index = (0 if resolver.task_type == "chief" else resolver.task_id + ("chief" in tf_config["cluster"]))
    return strategy, Topology("multiworker", replicas=strategy.num_replicas_in_sync, workers=workers,
                              worker_index=index, is_chief=is_chief(tf_config))


def split_global_batches(dataset, context, global_batch: int):
    """This input pipeline's per-replica slices of each global batch, in replica order.

    Global batch g of B examples, with R replicas in all and L = R / P of them fed by each of the P input
    pipelines (one per worker), gives pipeline p the slices [(p L + r) b, (p L + r + 1) b) for r = 0..L-1, with
    b = B / R, as consecutive elements; tf.distribute hands a pipeline's consecutive elements to its replicas
    in order. So the replicas of all workers together compute on exactly the examples of the one-device batch g.

    Args:
      dataset: batches (x (B, ...), y (B,)) identical on every worker (a function of seed and epoch only).
      context: the tf.distribute.InputContext of this pipeline.
      global_batch: B, divisible by R.
    Returns:
      A dataset of (x (b, ...), y (b,)) elements, L per global batch.
    """
    import tensorflow as tf

    from pipeline.data import in_memory as data_lib

    per_replica = context.get_per_replica_batch_size(global_batch)
    local = data_lib.local_replicas(context)
    first = context.input_pipeline_id * local * per_replica

    def slices(x, y):
        x = tf.reshape(x[first:first + local * per_replica], [local, per_replica] + x.shape[1:].as_list())
        y = tf.reshape(y[first:first + local * per_replica], [local, per_replica])
        return tf.data.Dataset.from_tensor_slices((x, y))

    batches = dataset.cardinality()
    dataset = dataset.flat_map(slices)
    if local == 1 and batches >= 0:
        # tf.distribute reports a pipeline's element count as the distributed dataset's steps; with several
        # replicas per worker that count is not the number of steps, so it stays unknown.
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(batches))
    return dataset.prefetch(tf.data.AUTOTUNE)


def distribute_train(strategy, topology: Topology, make_dataset, global_batch: int, sharded: bool = False):
    """The training input for Model.fit: global batches identical to the one-device run's, split over replicas, or
    with `sharded` (streamed input) each worker's per-replica batches of its own files.

    Args:
      strategy: from build_strategy.
      topology: from build_strategy.
      make_dataset: function returning the one-device dataset of global batches; with sharded, called with
        input_context= a tf.distribute.InputContext it returns that input pipeline's per-replica batches.
      global_batch: examples per global batch.
      sharded: whether make_dataset reads a shard of the data per input pipeline (pipeline.data.streamed).
    Returns:
      make_dataset() itself on one device and under mirrored (Keras' experimental_distribute_dataset cuts each
      global batch into consecutive per-replica slices), else a distributed dataset from split_global_batches or,
      sharded, from make_dataset(input_context=...).
    """
    if topology.workers == 1:
        return make_dataset()
    import tensorflow as tf

    options = tf.distribute.InputOptions(experimental_fetch_to_device=True)
    if sharded:
        return strategy.distribute_datasets_from_function(lambda context: make_dataset(input_context=context),
                                                          options)
    return strategy.distribute_datasets_from_function(
        lambda context: split_global_batches(make_dataset(), context, global_batch), options)


def worker_folder(copy_of: str | None = None) -> str:
    """A temporary folder outside the run directory for the files a non-chief worker must write.

    TensorFlow's multi-worker saving runs on every worker (reading some variables is a collective), so the other
    workers save their checkpoints and export too, but into folders of their own that are removed at exit.

    Args:
      copy_of: a folder whose files the new one starts with (the chief's checkpoints, so that a resumed worker
        restores the same state as the chief), or None.
    Returns:
      The folder's path.
    """
    folder = tempfile.mkdtemp(prefix="batchscope-worker-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    if copy_of and os.path.isdir(copy_of):
        shutil.copytree(copy_of, folder, dirs_exist_ok=True)
    return folder


def lost_worker_message(error) -> str:
    """One line for a multi-worker step that failed because another worker stopped answering."""
    import re

    task = re.search(r"/job:\w+/replica:\d+/task:\d+", getattr(error, "message", "") or str(error))
    return (f"lost contact with another worker ({task.group(0) + ', ' if task else ''}{type(error).__name__}); "
            "restart every worker with --resume to continue from the last checkpoint")
