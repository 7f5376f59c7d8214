"""Input data: digits, TFDS, folder: and npz: sources held in memory, and the tf.data pipelines over them.

TFDS and folder: sources can also be streamed from their files (--input stream, pipeline/data/streamed.py)."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from pipeline.config import Config
from pipeline.data import sources

PAD = 4  # Pixels of zero padding on each side before the random crop (He et al. 2016, sec. 4.2).


def crop_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Pads PAD zero pixels on each side, crops a random window of the original size and flips it left-right
    with probability 1/2 (the CIFAR augmentation of He et al. 2016, sec. 4.2).

    Args:
        image: float32 (H, W, C) raw pixels.
        seed: int64 (2,) stateless seed; the same seed gives the same crop and flip, eagerly or in a graph.

    Returns:
        The augmented float32 (H, W, C) image.
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    padded = tf.pad(image, [[PAD, PAD], [PAD, PAD], [0, 0]])
    image = tf.image.stateless_random_crop(padded, tf.shape(image), seed=crop_seed)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def gather(images: tf.Tensor, labels: tf.Tensor, indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The examples at indices (one index or a batch of them) as float32 raw pixels and int32 labels."""
    return tf.cast(tf.gather(images, indices), tf.float32), tf.gather(labels, indices)


def local_replicas(input_context) -> int:
    """Replicas that one input pipeline feeds (1 without an input context): each yields that many batches a step."""
    return input_context.num_replicas_in_sync // input_context.num_input_pipelines if input_context else 1


def epoch_key(seed, epoch) -> tf.Tensor:
    """The stateless key of one epoch's random choices (order and augmentation), from (seed, epoch) only."""
    return tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)])


def train_epoch(images, labels, batch_size: int, seed, epoch, augment: bool) -> tf.data.Dataset:
    """One epoch of training batches in which every random choice is a function of (seed, epoch) only.

    Pipeline: pixels decoded at load time and held in memory (the cache) -> a full-dataset shuffle, a stateless
    permutation keyed by (seed, epoch) -> if augment, crop_flip per example, seeded by (seed, epoch, example
    index) -> batch, dropping the remainder (unaugmented batches are gathered whole, ~10x faster) -> float32.
    Nothing depends on the global TF seed or on how often a dataset was iterated, so epoch e of a resumed run
    repeats epoch e of the original bit for bit.

    Args:
        images: (N, H, W, C) uint8 or float32 tensor of raw pixels.
        labels: (N,) int32 tensor.
        batch_size: examples per batch.
        seed: the run's seed (int or int64 scalar tensor).
        epoch: the epoch number (int or int64 scalar tensor, read when the dataset is iterated).
        augment: whether to apply crop_flip.

    Returns:
        A dataset of (x float32 (B, H, W, C), y int32 (B,)) batches, floor(N / batch_size) of them.
    """
    key = epoch_key(seed, epoch)
    order = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(labels, out_type=tf.int64)[0]), seed=key)

    def augmented_example(index):
        image, label = gather(images, labels, index)
        return crop_flip(image, tf.random.experimental.stateless_fold_in(key, index)), label

    dataset = tf.data.Dataset.from_tensor_slices(order)
    if augment:
        dataset = dataset.map(augmented_example, num_parallel_calls=tf.data.AUTOTUNE)
        return dataset.batch(batch_size, drop_remainder=True)
    dataset = dataset.batch(batch_size, drop_remainder=True)
    return dataset.map(lambda indices: gather(images, labels, indices), num_parallel_calls=tf.data.AUTOTUNE)


class SelectEpoch(keras.callbacks.Callback):
    """Sets data.epoch_variable to each epoch as it begins: what a dataset from train_dataset(epoch=None), given to
    Model.fit with one iterator per epoch, yields (DataInfo.fit_input returns it with such a dataset).

    Args:
        data: the run's DataInfo.
    """

    def __init__(self, data: "DataInfo"):
        super().__init__()
        self.data = data

    def on_epoch_begin(self, epoch, logs=None):
        self.data.set_epoch(epoch)


@dataclasses.dataclass(frozen=True)
class FitInput:
    """The training input of one Model.fit call (DataInfo.fit_input).

    make(input_context=None) builds the training batches; steps_per_epoch and callbacks go to fit as they are (the
    callbacks before the run's own, so that the epoch is selected before anything else sees it begin).
    """

    make: Callable[..., tf.data.Dataset]
    steps_per_epoch: int | None
    callbacks: list


@dataclasses.dataclass(frozen=True, eq=False)
class DataInfo:
    """What the model and the run know of the data, whether it is held in memory (Data) or streamed from files
    (pipeline.data.streamed.StreamingData), and the training pipelines common to both.

    mean and variance are per channel over (N, H, W) of the raw training pixels, the population variance
    (ddof=0) as keras.layers.Normalization.adapt computes it. augmentation is what train_dataset(augment=True)
    applies: "crop-flip" or "none".
    """

    source: str
    input_shape: tuple[int, int, int]
    num_classes: int
    class_names: list[str]
    num_train: int
    num_val: int
    num_test: int
    mean: np.ndarray
    variance: np.ndarray
    augmentation: str
    epoch_variable: tf.Variable = dataclasses.field(repr=False)

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch that datasets from train_dataset(epoch=None) yield when next iterated (SelectEpoch)."""
        self.epoch_variable.assign(epoch)

    def train_dataset(self, batch_size: int, *, seed: int, augment: bool = True, epoch: int | None = None,
                      input_context=None):
        """One epoch of shuffled, augmented training batches; the remainder is dropped.

        Args:
            batch_size: examples per batch (the global batch).
            seed: the run's seed; the order and augmentation depend only on (seed, epoch) (see the subclass).
            augment: apply the dataset's augmentation (self.augmentation); False gives plain shuffled batches.
            epoch: the epoch to yield; None reads self.epoch_variable each time an iterator is created, so one
                dataset given to Model.fit yields epoch e when SelectEpoch calls set_epoch(e) in on_epoch_begin.
            input_context: a tf.distribute.InputContext: this input pipeline's per-replica batches of its own
                files (streamed data only; in-memory data is split by distribute.split_global_batches).

        Returns:
            A prefetched dataset of (x float32 (B, H, W, C), y int32 (B,)) with num_train // batch_size batches.
        """
        augment = augment and self.augmentation == "crop-flip"
        if epoch is None:

            def current_epoch(_):
                return self.epoch(batch_size, seed, self.epoch_variable.read_value(), augment, input_context)

            # flat_map calls its function each time an iterator is created, so the variable is read then, not now.
            dataset = tf.data.Dataset.from_tensors(0).flat_map(current_epoch)
        else:
            dataset = self.epoch(batch_size, seed, epoch, augment, input_context)
        return self._counted(dataset, batch_size, 1, input_context)

    def train_epochs(self, batch_size: int, *, seed: int, first_epoch: int, epochs: int, input_context=None):
        """Epochs first_epoch, ..., epochs - 1 of train_dataset(epoch=e), one after another, for one Model.fit call
        with steps_per_epoch=num_train // batch_size (and steps per call that divide it).

        Given steps_per_epoch, Keras keeps one iterator for the whole fit call instead of creating one per epoch and
        waiting for its first batches; here the next epoch is opened while the current one is read, so its first
        batches (for streamed data: its first shuffle block, read and decoded) are ready when it starts. The batches
        are exactly those of train_dataset(epoch=e), so resume and the order as a function of (seed, epoch) hold.

        Args:
            batch_size, seed, input_context: as in train_dataset (always augmented as self.augmentation says).
            first_epoch: the first epoch to yield (fit's initial_epoch).
            epochs: one past the last epoch to yield (fit's epochs).

        Returns:
            A prefetched dataset of (epochs - first_epoch) * (num_train // batch_size) batches.
        """
        augment = self.augmentation == "crop-flip"
        local = local_replicas(input_context)
        # Two epochs open at a time, each taken whole (block_length: its elements) before the next, so the order is
        # epoch after epoch; the parallel interleave fills the next epoch's first elements in the background.
        dataset = tf.data.Dataset.range(first_epoch, epochs).interleave(
            lambda epoch: self.epoch(batch_size, seed, epoch, augment, input_context), cycle_length=2,
            block_length=self.num_train // batch_size * local, num_parallel_calls=2, deterministic=True)
        return self._counted(dataset, batch_size, epochs - first_epoch, input_context)

    def fit_input(self, batch_size: int, *, seed: int, first_epoch: int, epochs: int,
                  steps_per_execution: int) -> FitInput:
        """The training input of one Model.fit over epochs first_epoch..epochs - 1: the one place that chooses how
        fit gets each epoch's batches, which depend only on (seed, epoch) so that a resumed run sees the same ones.

        One iterator for the whole call (train_epochs, with steps_per_epoch) when the steps per compiled call divide
        an epoch: the epochs come one after another from that iterator. Otherwise a call would run across an epoch's
        end, so fit creates one iterator per epoch (train_dataset(epoch=None), steps_per_epoch None), and the epoch it
        reads is selected by the callback returned with it (SelectEpoch), which sets epoch_variable as each epoch
        begins.
        """
        steps = self.num_train // batch_size
        if steps % steps_per_execution:
            return FitInput(functools.partial(self.train_dataset, batch_size, seed=seed), None, [SelectEpoch(self)])
        whole = functools.partial(self.train_epochs, batch_size, seed=seed, first_epoch=first_epoch, epochs=epochs)
        return FitInput(whole, steps, [])

    def _counted(self, dataset: tf.data.Dataset, batch_size: int, epochs: int, input_context) -> tf.data.Dataset:
        """dataset, `epochs` epochs of training batches, with its number of steps made known, prefetched."""
        steps = self.num_train // batch_size * epochs
        # With several local replicas the count of elements is not the count of steps.
        if local_replicas(input_context) == 1:
            dataset = dataset.apply(tf.data.experimental.assert_cardinality(steps))
        return dataset.prefetch(tf.data.AUTOTUNE)

    def stream(self, batch_size: int, *, seed: int, augment: bool = True) -> tf.data.Dataset:
        """Endless training batches: epoch 0, 1, 2, ... of (seed, epoch), each in its own order.

        For the instruments: a repeated train_dataset(epoch=k) would show them the same batches every epoch.
        """
        augment = augment and self.augmentation == "crop-flip"
        epochs = tf.data.Dataset.counter()
        dataset = epochs.flat_map(lambda epoch: self.epoch(batch_size, seed, epoch, augment, None))
        return dataset.prefetch(tf.data.AUTOTUNE)

    def draws(self, batch_size: int, *, seed: int, step: int) -> tf.data.Dataset:
        """An instrument's batches at `step`: one pass over the training split keyed by (seed, -1 - step), never a
        training epoch's key (seed, epoch >= 0); a function of (seed, step) only, so a resumed run measures on the
        examples of an uninterrupted one, with no iterator position to save."""
        return self.epoch(batch_size, seed, -1 - step, self.augmentation == "crop-flip", None)

    def epoch(self, batch_size: int, seed, epoch, augment: bool, input_context) -> tf.data.Dataset:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, eq=False)
class Data(DataInfo):
    """Train, val and test splits held in memory as raw pixels, with their statistics and tf.data pipelines."""

    splits: dict[str, tuple[tf.Tensor, tf.Tensor]] = dataclasses.field(repr=False)

    def epoch(self, batch_size: int, seed, epoch, augment: bool, input_context) -> tf.data.Dataset:
        """train_epoch over the training split: every global batch is the same on every replica and worker."""
        if input_context is not None:
            raise ValueError("in-memory data is split over replicas by distribute.split_global_batches")
        images, labels = self.splits["train"]
        return train_epoch(images, labels, batch_size, seed, epoch, augment)

    def eval_dataset(self, split: str, batch_size: int) -> tf.data.Dataset:
        """Batches of a split in its stored order, not augmented, keeping the last partial batch.

        Args:
            split: "train", "val" or "test".
            batch_size: examples per batch.

        Returns:
            A prefetched dataset of (x float32 (B, H, W, C), y int32 (B,)).
        """
        images, labels = self._split(split)
        dataset = tf.data.Dataset.range(len(labels)).batch(batch_size)
        dataset = dataset.map(lambda indices: gather(images, labels, indices), num_parallel_calls=tf.data.AUTOTUNE)
        return dataset.prefetch(tf.data.AUTOTUNE)

    def arrays(self, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A split (its first `limit` examples) as numpy: (x float32 (N, H, W, C) raw pixels, y int32 (N,)), in
        eval_dataset's order."""
        images, labels = self._split(split)
        return images[:limit].numpy().astype(np.float32), labels[:limit].numpy().astype(np.int32)

    def _split(self, split: str) -> tuple[tf.Tensor, tf.Tensor]:
        if split not in self.splits:
            raise ValueError(f"split must be one of {', '.join(sources.SPLITS)}, got {split!r}")
        return self.splits[split]


def load(config: Config) -> Data:
    """Reads config.dataset into memory and splits it into train, val and test (pipeline.data.loading.load chooses between
    this and streaming from files, --input).

    Sources: "digits" (sklearn's bundled 8x8 digits, values 0..16), a TFDS image-classification name (cifar10,
    mnist, ...; read from config.data_dir, downloaded only with config.download), "folder:PATH" (one subfolder
    of PNG/JPEG images per class) and "npz:PATH" (arrays x_train, y_train, x_test, y_test, optional x_val,
    y_val and class_names). All splits are held in memory, which suits the small-image datasets this project
    measures. Splits a source lacks are carved out with a stratified split under the constant sources.SPLIT_SEED:
    test is sources.TEST_FRACTION of all examples, val is config.val_fraction of the rest.

    Args:
        config: the run's Config; uses dataset, data_dir, download, val_fraction and augment.

    Returns:
        The Data.

    Raises:
        InputError: naming the flag or file, for an unknown, unprepared or malformed dataset.
    """
    source = config.dataset
    if source == "digits":
        splits, class_names = sources.digits()
    elif source.startswith("folder:"):
        splits, class_names = sources.folder(source.removeprefix("folder:"))
    elif source.startswith("npz:"):
        splits, class_names = sources.npz(source.removeprefix("npz:"))
    else:
        splits, class_names = sources.tfds_dataset(source, config)
    for split in ("test", "val"):
        if split not in splits:
            fraction = sources.TEST_FRACTION if split == "test" else config.val_fraction
            splits["train"], splits[split] = sources.hold_out(*splits["train"], fraction, source)
    sources.check_classes(class_names, source, splits["train"][1])
    images = splits["train"][0]
    mean, variance = sources.channel_stats(images)
    return Data(
        source=source,
        input_shape=tuple(int(d) for d in images.shape[1:]),
        num_classes=len(class_names),
        class_names=list(class_names),
        num_train=len(splits["train"][1]),
        num_val=len(splits["val"][1]),
        num_test=len(splits["test"][1]),
        mean=mean,
        variance=variance,
        augmentation=sources.resolve_augmentation(config.augment, images.shape[1:]),
        epoch_variable=tf.Variable(0, dtype=tf.int64, trainable=False, name="data_epoch"),
        splits={split: (tf.constant(x), tf.constant(y, tf.int32)) for split, (x, y) in splits.items()},
    )


def count(config: Config) -> tuple[int, int, int]:
    """(num_train, num_val, num_test) that load(config) gives, without decoding the images where the source allows.

    The splits a source lacks are held out as in load: sklearn's train_test_split holds out ceil(fraction * n)
    examples. Streamed TFDS data holds the same counts out, as slices of the stored order (pipeline.data.streamed).
    """
    sizes = sources.split_sizes(config.dataset, config)
    if sizes is None or "train" not in sizes:
        data = load(config)  # The source can only be counted by loading it (or it is bad, and load says how).
        return data.num_train, data.num_val, data.num_test
    for split in ("test", "val"):
        if split not in sizes:
            fraction = sources.TEST_FRACTION if split == "test" else config.val_fraction
            sizes[split] = math.ceil(fraction * sizes["train"])
            sizes["train"] -= sizes[split]
    return sizes["train"], sizes["val"], sizes["test"]
