"""Data streamed from its files (--input stream): TFDS record files and folder: images, sharded by file over the
workers, read interleaved, decoded in parallel and optionally cached to disk, instead of held in memory.

What streaming guarantees, against the in-memory path's exact global batches (pipeline/data/in_memory.py):
- Every split is read in one fixed order: TFDS's record files interleaved CYCLE_LENGTH at a time in file order
  (TFDS shuffled the examples when it prepared them), a folder's training images in one permutation under the
  constant SPLIT_SEED; val and test in their stored order. --cache-dir keeps exactly that order on disk, so a cache
  changes the speed of a run, never its numbers.
- Epoch e shuffles that order in blocks of SHUFFLE_BUFFER examples keyed by (seed, epoch); augmentation is
  seeded per example by (seed, epoch, position). So epoch e of a resumed run repeats epoch e of the original run,
  with or without --deterministic, as long as the number of workers is the same.
- The examples of a global batch differ from the in-memory run's (another order), and from a run with another
  number of workers: with several workers each reads only its own files (TFDS shards by file through
  tfds.ReadConfig(input_context=...), a folder's files are dealt round robin), and each fills its share of every
  global batch from them. A worker's epoch is num_train // batch steps; one with fewer examples than that starts
  its files again, one with more leaves its last ones out of that epoch.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import math
import os

import numpy as np
import tensorflow as tf

from pipeline.config import Config, InputError
from pipeline.data import in_memory as data_lib
from pipeline.data import sources

SHUFFLE_BUFFER = 10_000  # Examples held for shuffling per worker: 30 MB of 32x32 colour images. A split of at most
# this many examples is shuffled completely every epoch; a larger one within consecutive blocks of this many.
CYCLE_LENGTH = 16  # TFDS record files that one worker reads at a time, interleaved (TFDS's default is 16 as well).
DECODE_BATCH = 1024  # Examples per batch in the one pass that computes the normalization statistics.


@dataclasses.dataclass(frozen=True, eq=False)
class StreamingData(data_lib.DataInfo):
    """Train, val and test splits read from their files each time a dataset is iterated (see the module docstring).

    read(split, input_context) gives (uint8 (H, W, C) image, int32 label) examples of a split in its fixed order:
    all of them, or with a tf.distribute.InputContext the ones in this input pipeline's files; from the cache
    when there is one.
    """

    read: object = dataclasses.field(repr=False, default=None)

    def epoch(self, batch_size: int, seed, epoch, augment: bool, input_context) -> tf.data.Dataset:
        """Pipeline: read (decoded in parallel; cached) -> shuffle_blocks keyed by (seed, epoch) -> if augment,
        crop_flip keyed by (seed, epoch, position) -> batch -> float32.

        With an input_context the batches are this pipeline's per-replica batches, batch_size / replicas examples,
        num_train // batch_size of them per local replica.
        """
        key = data_lib.epoch_key(seed, epoch)
        examples = self.read("train", input_context)
        if input_context is not None:
            # Every worker takes the same number of steps whatever the size of its files (see the module docstring).
            examples = examples.repeat()
        examples = shuffle_blocks(examples, key)

        def example(position, image_label):
            image, label = tf.cast(image_label[0], tf.float32), image_label[1]
            if augment:
                image = data_lib.crop_flip(image, tf.random.experimental.stateless_fold_in(key, position))
            return image, label

        examples = examples.enumerate().map(example, num_parallel_calls=tf.data.AUTOTUNE)
        if input_context is None:
            return examples.batch(batch_size, drop_remainder=True)
        per_replica = input_context.get_per_replica_batch_size(batch_size)
        local = data_lib.local_replicas(input_context)
        return examples.take((self.num_train // batch_size) * local * per_replica).batch(per_replica)

    def eval_dataset(self, split: str, batch_size: int) -> tf.data.Dataset:
        """Batches of a split in its stored order, not augmented, keeping the last partial batch."""
        dataset = self._read(split).batch(batch_size)
        dataset = dataset.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
        return dataset.prefetch(tf.data.AUTOTUNE)

    def arrays(self, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A split (its first `limit` examples) as numpy: (x float32 (N, H, W, C), y int32 (N,)), in eval_dataset's
        order. The whole split is read into memory: for evaluation and a few examples, not for training."""
        dataset = self._read(split)
        dataset = dataset.take(limit) if limit is not None else dataset
        x, y = zip(*dataset.batch(DECODE_BATCH).as_numpy_iterator())
        return np.concatenate(x).astype(np.float32), np.concatenate(y).astype(np.int32)

    def _read(self, split: str) -> tf.data.Dataset:
        if split not in sources.SPLITS:
            raise ValueError(f"split must be one of {', '.join(sources.SPLITS)}, got {split!r}")
        return self.read(split, None)


def shuffle_blocks(examples: tf.data.Dataset, key: tf.Tensor) -> tf.data.Dataset:
    """Each block of SHUFFLE_BUFFER consecutive examples in a stateless random order keyed by (key, block).

    Dataset.shuffle would hold as many examples, but its seed mixes in TensorFlow's global seed, and a seed that is a
    tensor (the epoch read from a variable) fails in a traced function when the global seed is 0 (random_seed.get_seed
    compares the seed pair with (0, 0) in Python); a stateless permutation is a function of (seed, epoch) only, as
    in pipeline/data/in_memory.py.
    """

    def permuted(block_index, block):
        size = tf.shape(block[1], out_type=tf.int64)[0]
        block_key = tf.random.experimental.stateless_fold_in(key, block_index)
        order = tf.random.experimental.stateless_shuffle(tf.range(size), seed=block_key)
        return tf.data.Dataset.from_tensor_slices(tuple(tf.gather(part, order) for part in block))

    # The next block is read while the current one is trained on; an epoch's first block is read before its first
    # batch (as a shuffle buffer is filled first).
    return examples.batch(SHUFFLE_BUFFER).prefetch(1).enumerate().flat_map(permuted)


def load(config: Config) -> StreamingData:
    """The StreamingData of config.dataset (a TFDS name or folder:PATH), after one pass over its training split
    that computes the normalization statistics with keras.layers.Normalization.adapt (and fills the cache).

    Splits the source lacks are held out as pipeline.data.in_memory.load holds them out, with the same sizes: a folder's by the
    same stratified split of its files, a TFDS dataset's as the last examples of its train split (TFDS's slicing).

    Raises:
        InputError: naming the flag or file: an unknown, unprepared or malformed dataset, a cache folder that cannot
            be written.
    """
    source = config.dataset
    if source.startswith("folder:"):
        read, class_names, files, identity = _folder(source.removeprefix("folder:"), config)
    else:
        read, class_names, files, identity = _tfds(source, config)
    if config.cache_dir:
        read = _caching(read, config.cache_dir, identity)
    try:
        # A folder's val and test images are decoded once here too, so that a bad one is named now, not mid-run.
        counts = {split: _count(read(split, None), iterate=split != "train" and bool(files)) for split in sources.SPLITS}
        first, _ = next(iter(read("train", None)))
        statistics = _statistics(read("train", None))
    except tf.errors.OpError as e:  # An image that cannot be decoded or has another shape: name the file.
        if source.startswith("folder:"):
            _first_bad_image(files)
        raise InputError(f"--dataset: cannot read {source}: {e.message.splitlines()[0]}") from None
    input_shape = tuple(int(d) for d in first.shape)
    return StreamingData(
        source=source,
        input_shape=input_shape,
        num_classes=len(class_names),
        class_names=list(class_names),
        num_train=counts["train"],
        num_val=counts["val"],
        num_test=counts["test"],
        mean=statistics[0],
        variance=statistics[1],
        augmentation=sources.resolve_augmentation(config.augment, input_shape),
        epoch_variable=tf.Variable(0, dtype=tf.int64, trainable=False, name="data_epoch"),
        read=read,
    )


def _tfds(name: str, config: Config):
    """(read, class names, no files, what identifies the data) of a TFDS dataset, read through tfds.ReadConfig (sharded by file, interleaved,
    decoded in parallel by TFDS)."""
    import tensorflow_datasets as tfds

    builder, class_names, wanted = sources.tfds_builder(name, config)
    with sources.tfds_prepared(name, config):
        if config.download:
            builder.download_and_prepare()
        total = _count(builder.as_dataset(split="train", read_config=tfds.ReadConfig(try_autocache=False)))
    splits = {split: wanted[split] for split in wanted if split != "train"}
    train = total
    for split in ("test", "val"):  # The sizes of pipeline.data.in_memory.count: ceil(fraction * n) held out.
        if split not in splits:
            held = math.ceil((sources.TEST_FRACTION if split == "test" else config.val_fraction) * train)
            splits[split] = f"train[{train - held}:{train}]"
            train -= held
    splits["train"] = "train" if train == total else f"train[:{train}]"

    def read(split: str, input_context) -> tf.data.Dataset:
        read_config = tfds.ReadConfig(input_context=input_context, try_autocache=False, skip_prefetch=True,
                                      interleave_cycle_length=CYCLE_LENGTH)
        try:
            with sources.tfds_prepared(name, config):
                dataset = builder.as_dataset(split=splits[split], as_supervised=True, shuffle_files=False,
                                             read_config=read_config)
        except ValueError as e:
            if input_context is None or "num_input_pipelines" not in str(e):
                raise
            raise InputError(f"--input: stream gives each worker its own files, and {name} {splits[split]} has "
                             f"fewer files than the {input_context.num_input_pipelines} workers; use --input memory"
                             ) from None
        return dataset.map(lambda x, y: (x, tf.cast(y, tf.int32)), num_parallel_calls=tf.data.AUTOTUNE)

    return read, class_names, [], (name, str(builder.info.version), str(builder.data_dir), splits)


def _folder(path: str, config: Config):
    """(read, class names, the image files, what identifies the data) of a folder: dataset: one file per example,
    decoded in parallel."""
    classes = sources.class_files(path, report_skipped=True)
    files = np.array([file for names in classes.values() for file in names])
    labels = np.concatenate([np.full(len(names), label, np.int32) for label, names in enumerate(classes.values())])
    splits = {"train": (files, labels)}
    for split in ("test", "val"):  # The same stratified hold-out as the in-memory path, on file names.
        fraction = sources.TEST_FRACTION if split == "test" else config.val_fraction
        splits["train"], splits[split] = sources.hold_out(*splits["train"], fraction, f"folder:{path}")
    # One fixed permutation, so that a shuffle buffer smaller than the split still sees every class.
    order = np.random.default_rng(sources.SPLIT_SEED).permutation(len(splits["train"][1]))
    splits["train"] = (splits["train"][0][order], splits["train"][1][order])
    shape = sources.read_image(str(splits["train"][0][0])).shape

    def decode(file, label):
        image = tf.ensure_shape(sources.decode_image(tf.io.read_file(file)), shape)
        return image, label

    def read(split: str, input_context) -> tf.data.Dataset:
        dataset = tf.data.Dataset.from_tensor_slices(splits[split])
        if input_context is not None:
            if len(splits[split][1]) < input_context.num_input_pipelines:
                raise InputError(f"--input: folder:{path} has fewer {split} images than the "
                                 f"{input_context.num_input_pipelines} workers; use --input memory")
            dataset = dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        return dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE)

    files = [str(f) for f in files]
    return read, list(classes), files, (os.path.abspath(path), files, {s: v[0].tolist() for s, v in splits.items()})


def _caching(read, cache_dir: str, identity):
    """read, with each (split, shard) cached once under cache_dir by tf.data's Dataset.cache(filename).

    A cache is written whole under a name of this process and renamed into place (its index last), so that an
    interrupted pass leaves no half cache that a later run would read. Its name hashes what the data is (dataset,
    version, files, split, shard), so a changed dataset never reads another's cache.
    """
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with open(os.path.join(cache_dir, f".write-test-{os.getpid()}"), "w"):
            pass
        os.remove(os.path.join(cache_dir, f".write-test-{os.getpid()}"))
    except OSError as e:
        raise InputError(f"--cache-dir: cannot write to {cache_dir} ({e.strerror}); give a writable folder or \"\" "
                         "(no cache)") from None

    data_key = hashlib.sha256(repr(identity).encode()).hexdigest()

    def cached(split: str, input_context) -> tf.data.Dataset:
        shard = (input_context.input_pipeline_id, input_context.num_input_pipelines) if input_context else (0, 1)
        key = hashlib.sha256(repr((data_key, split, shard)).encode()).hexdigest()[:16]
        prefix = os.path.join(cache_dir, f"{split}-{shard[0]}of{shard[1]}-{key}")
        # Written now, eagerly, even when called while an epoch's function is traced (init_scope leaves the graph).
        with tf.init_scope():
            if not os.path.exists(prefix + ".index"):
                partial = f"{prefix}.partial-{os.getpid()}"
                _count(read(split, input_context).cache(partial), iterate=True)
                for data_file in glob.glob(glob.escape(partial) + ".data-*"):
                    os.replace(data_file, prefix + data_file[len(partial):])
                os.replace(partial + ".index", prefix + ".index")
        return read(split, input_context).cache(prefix)

    return cached


def _count(dataset: tf.data.Dataset, iterate: bool = False) -> int:
    """Examples in a dataset: its known cardinality, or one pass over it (always with iterate)."""
    known = int(dataset.cardinality())
    if known >= 0 and not iterate:
        return known
    return int(dataset.reduce(np.int64(0), lambda count, *_: count + 1))


def _statistics(examples: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population variance of the raw pixels, by keras.layers.Normalization.adapt."""
    import keras

    normalization = keras.layers.Normalization(axis=-1)
    normalization.adapt(examples.map(lambda x, _: tf.cast(x, tf.float32)).batch(DECODE_BATCH))
    return normalization.adapt_mean.numpy().reshape(-1), normalization.adapt_variance.numpy().reshape(-1)


def _first_bad_image(files: list[str]) -> None:
    """Raises the InputError of sources.read_image for the first file that cannot be decoded or differs in shape."""
    first = None
    for file in files:
        image = sources.read_image(file, first)
        first = first or (file, image.shape)
