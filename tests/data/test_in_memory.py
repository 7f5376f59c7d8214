"""Tests of pipeline.data.in_memory: sources, splits, statistics, seeded order, augmentation and input errors."""

import collections
import dataclasses
import os
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from pipeline.config import Config, InputError
from pipeline.data import in_memory as data, loading, sources


def batches(dataset):
    return [(x.numpy(), y.numpy()) for x, y in dataset]


def same_batches(a, b):
    pairs = zip(a, b)
    return len(a) == len(b) and all(np.array_equal(xa, xb) and np.array_equal(ya, yb) for (xa, ya), (xb, yb) in pairs)


def rows(x, y):
    """A multiset of examples, each as (pixel bytes, label)."""
    return collections.Counter((xi.tobytes(), int(yi)) for xi, yi in zip(x, y))


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return f"npz:{path}"


def colour_npz(tmp_path, n=60, size=32):
    """A 32x32 colour dataset whose images are all different, so augmented copies can be traced back."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    y = np.arange(n, dtype=np.int64) % 3
    return write_npz(tmp_path / "colour.npz", x_train=x, y_train=y, x_test=x[:6], y_test=y[:6])


def crop_flip_matches(augmented, original):
    """Brute force: the (dy, dx, mirrored) for which augmented is that window of the zero-padded original."""
    h, w, _ = original.shape
    padded = np.pad(original, [(data.PAD, data.PAD), (data.PAD, data.PAD), (0, 0)])
    offsets = [(dy, dx) for dy in range(2 * data.PAD + 1) for dx in range(2 * data.PAD + 1)]
    return {
        (dy, dx, mirrored)
        for dy, dx in offsets
        for mirrored in (False, True)
        if np.array_equal(augmented[:, ::-1] if mirrored else augmented, padded[dy : dy + h, dx : dx + w])
    }


@pytest.fixture(scope="module")
def digits():
    return data.load(Config())


def test_digits_shapes_dtypes_and_split_sizes(digits):
    assert (digits.input_shape, digits.num_classes, digits.augmentation) == ((8, 8, 1), 10, "none")
    assert digits.class_names == [str(d) for d in range(10)]
    assert (digits.num_train, digits.num_val, digits.num_test) == (1293, 144, 360)  # 1797: 20% test, 10% of rest.
    x, y = next(iter(digits.train_dataset(64, seed=0, epoch=0)))
    assert (x.shape, x.dtype, y.shape, y.dtype) == ((64, 8, 8, 1), tf.float32, (64,), tf.int32)
    assert len(batches(digits.train_dataset(64, seed=0, epoch=0))) == 1293 // 64
    assert digits.train_dataset(64, seed=0).cardinality().numpy() == 1293 // 64
    eval_batches = batches(digits.eval_dataset("val", 64))
    assert [len(y) for _, y in eval_batches] == [64, 64, 16]  # The remainder is kept.
    x, y = digits.arrays("test")
    assert (x.dtype, y.dtype, x.shape, x.min(), x.max()) == (np.float32, np.int32, (360, 8, 8, 1), 0, 16)
    with pytest.raises(ValueError, match="split"):
        digits.arrays("validation")


def test_digits_splits_partition_the_data_and_ignore_the_seed(digits):
    original = load_digits()
    x_all, y_all = original.images[..., None].astype(np.float32), original.target
    splits = [digits.arrays(split) for split in ("train", "val", "test")]
    merged = sum((rows(x, y) for x, y in splits), collections.Counter())
    assert merged == rows(x_all, y_all)  # Every example lands in exactly one split: no overlap, none lost.
    counts = np.bincount(y_all, minlength=10)
    assert np.all(np.abs(np.bincount(splits[2][1], minlength=10) - 0.2 * counts) <= 1)  # Stratified test split.
    other = data.load(dataclasses.replace(Config(), seed=5))
    for split in ("train", "val", "test"):
        assert all(np.array_equal(a, b) for a, b in zip(digits.arrays(split), other.arrays(split)))


def test_normalization_statistics_are_those_of_the_train_split(digits, tmp_path):
    for loaded in (digits, data.load(Config(dataset=colour_npz(tmp_path)))):
        x, _ = loaded.arrays("train")
        pixels = x.astype(np.float64).reshape(-1, x.shape[-1])
        mean = np.array([np.mean(pixels[:, c]) for c in range(x.shape[-1])])
        variance = np.array([np.mean((pixels[:, c] - mean[c]) ** 2) for c in range(x.shape[-1])])
        assert loaded.mean.dtype == loaded.variance.dtype == np.float32
        np.testing.assert_allclose(loaded.mean, mean, rtol=1e-6)
        np.testing.assert_allclose(loaded.variance, variance, rtol=1e-6)


def test_train_order_depends_only_on_seed_and_epoch(digits):
    epoch_2 = batches(digits.train_dataset(32, seed=1, epoch=2))
    tf.random.set_seed(123)  # The global TF seed must not matter.
    assert same_batches(epoch_2, batches(digits.train_dataset(32, seed=1, epoch=2)))
    assert not same_batches(epoch_2, batches(digits.train_dataset(32, seed=1, epoch=3)))
    assert not same_batches(epoch_2, batches(digits.train_dataset(32, seed=2, epoch=2)))
    x, y = digits.arrays("train")
    seen = rows(np.concatenate([b[0] for b in epoch_2]), np.concatenate([b[1] for b in epoch_2]))
    assert not seen - rows(x, y) and sum(seen.values()) == 1293 // 32 * 32  # Distinct train examples, no repeats.


def test_stream_is_epoch_after_epoch(digits):
    per_epoch = 1293 // 32
    stream = batches(digits.stream(32, seed=1).take(3 * per_epoch))
    for epoch in range(3):
        expected = batches(digits.train_dataset(32, seed=1, epoch=epoch))
        assert same_batches(stream[epoch * per_epoch : (epoch + 1) * per_epoch], expected), epoch


def test_epoch_variable_is_read_each_time_the_dataset_is_iterated(digits):
    dataset = digits.train_dataset(64, seed=3, epoch=None)
    digits.set_epoch(3)
    at_3 = batches(dataset)
    digits.set_epoch(5)
    at_5 = batches(dataset)
    assert same_batches(at_3, batches(digits.train_dataset(64, seed=3, epoch=3)))
    assert same_batches(at_5, batches(digits.train_dataset(64, seed=3, epoch=5)))
    assert not same_batches(at_3, at_5)


class Recorder(keras.Model):
    """A linear model that keeps the last training batch it saw in a variable."""

    def __init__(self, batch_size, input_shape):
        super().__init__()
        self.flatten = keras.layers.Flatten()
        self.dense = keras.layers.Dense(3, activation="softmax")
        self.seen = tf.Variable(tf.zeros((batch_size, *input_shape)), trainable=False)

    def call(self, x):
        return self.dense(self.flatten(x))

    def train_step(self, batch):
        self.seen.assign(batch[0])
        return super().train_step(batch)


@pytest.mark.parametrize("one_iterator", [False, True])
@pytest.mark.parametrize("initial_epoch", [0, 2])
def test_fit_input_gives_fit_each_epoch_of_seed_and_epoch(tmp_path, initial_epoch, one_iterator):
    """DataInfo.fit_input, the one choice of how fit gets its epochs: one iterator over the call's epochs when the
    steps per compiled call divide an epoch, else one dataset per epoch with SelectEpoch. Either way fit sees epoch e's
    batches of train_dataset(epoch=e), from any initial epoch."""
    loaded = data.load(Config(dataset=colour_npz(tmp_path)))  # Augmented, so augmentation is checked too.
    steps = loaded.num_train // 8
    steps_per_execution = 1 if one_iterator else next(k for k in range(2, steps) if steps % k)
    epochs = range(initial_epoch, initial_epoch + 3)
    fit_input = loaded.fit_input(8, seed=4, first_epoch=initial_epoch, epochs=epochs[-1] + 1,
                                 steps_per_execution=steps_per_execution)
    assert fit_input.steps_per_epoch == (steps if one_iterator else None)
    assert [type(c) for c in fit_input.callbacks] == ([] if one_iterator else [data.SelectEpoch])
    model = Recorder(8, loaded.input_shape)
    model.compile("sgd", "sparse_categorical_crossentropy", jit_compile=False)
    seen = collections.defaultdict(list)

    class Record(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            seen[self.epoch].append(model.seen.numpy())

    loaded.set_epoch(7)  # whatever the variable held before: the input selects the epoch itself
    model.fit(fit_input.make(), steps_per_epoch=fit_input.steps_per_epoch, initial_epoch=initial_epoch,
              epochs=epochs[-1] + 1, callbacks=[*fit_input.callbacks, Record()], verbose=0)
    for epoch in epochs:
        expected = [x for x, _ in batches(loaded.train_dataset(8, seed=4, epoch=epoch))]
        assert len(seen[epoch]) == len(expected) == steps
        assert all(np.array_equal(a, b) for a, b in zip(seen[epoch], expected))
    assert not np.array_equal(seen[epochs[0]][0], seen[epochs[1]][0])


def test_crop_flip_eagerly_and_in_dataset_map():
    image = tf.reshape(tf.range(1, 10 * 12 * 3 + 1, dtype=tf.float32), (10, 12, 3))  # Distinct, nonzero pixels.
    seeds = tf.constant([[s, 7] for s in range(24)], tf.int64)
    mapped = list(tf.data.Dataset.from_tensor_slices(seeds).map(lambda s: data.crop_flip(image, s)))
    seen = set()
    for seed, in_map in zip(seeds, mapped):
        eager = data.crop_flip(image, seed).numpy()
        assert eager.shape == (10, 12, 3) and np.array_equal(eager, in_map.numpy())
        assert np.array_equal(eager, data.crop_flip(image, seed).numpy())  # Stateless: same seed, same output.
        matches = crop_flip_matches(eager, image.numpy())
        assert len(matches) == 1
        seen |= matches
    assert {mirrored for _, _, mirrored in seen} == {False, True} and len({(dy, dx) for dy, dx, _ in seen}) > 5


def test_decode_image_eagerly_and_in_dataset_map():
    images = np.random.default_rng(1).integers(0, 256, (3, 5, 4, 3), dtype=np.uint8)
    encoded = [tf.io.encode_png(image) for image in images]
    for image, contents in zip(images, encoded):
        assert np.array_equal(sources.decode_image(contents).numpy(), image)
    in_map = tf.data.Dataset.from_tensor_slices(tf.stack(encoded)).map(sources.decode_image)
    assert all(np.array_equal(a.numpy(), b) for a, b in zip(in_map, images))
    grey = images[0, :, :, :1]
    assert np.array_equal(sources.decode_image(tf.io.encode_png(grey)).numpy(), grey)
    smooth = np.broadcast_to(np.arange(0, 240, 15, dtype=np.uint8)[:, None, None], (16, 16, 3))  # JPEG suits it.
    jpeg = sources.decode_image(tf.io.encode_jpeg(smooth, quality=100)).numpy()
    assert jpeg.shape == (16, 16, 3) and np.abs(jpeg.astype(int) - smooth).max() <= 8  # Lossy, but the same image.


def test_augmentation_only_on_train_and_only_when_configured(tmp_path, digits):
    source = colour_npz(tmp_path)
    loaded = data.load(Config(dataset=source))
    assert loaded.augmentation == "crop-flip"
    plain = batches(loaded.train_dataset(10, seed=0, epoch=1, augment=False))
    augmented = batches(loaded.train_dataset(10, seed=0, epoch=1))
    assert [y.tolist() for _, y in plain] == [y.tolist() for _, y in augmented]  # Same order either way.
    pairs = [(a, p) for (xa, _), (xp, _) in zip(augmented, plain) for a, p in zip(xa, xp)]
    assert all(crop_flip_matches(a, p) for a, p in pairs) and sum(not np.array_equal(a, p) for a, p in pairs) > 40
    assert not rows(*[np.concatenate(part) for part in zip(*plain)]) - rows(*loaded.arrays("train"))
    for split in ("train", "val", "test"):
        evaluated = np.concatenate([x for x, _ in batches(loaded.eval_dataset(split, 7))])
        assert np.array_equal(evaluated, loaded.arrays(split)[0])
    off = data.load(Config(dataset=source, augment="none"))
    assert off.augmentation == "none"
    assert same_batches(plain, batches(off.train_dataset(10, seed=0, epoch=1)))
    assert digits.augmentation == "none"
    assert data.load(Config(augment="crop-flip")).augmentation == "crop-flip"


def test_tfds_sources_through_mock_data():
    with tfds.testing.mock_data(num_examples=50):
        cifar = data.load(Config(dataset="cifar10"))
        mnist = data.load(Config(dataset="mnist"))
    assert (cifar.input_shape, cifar.num_classes, len(cifar.class_names)) == ((32, 32, 3), 10, 10)
    assert cifar.augmentation == "crop-flip"
    assert (mnist.input_shape, mnist.num_classes, mnist.augmentation) == ((28, 28, 1), 10, "none")
    for loaded in (cifar, mnist):
        assert (loaded.num_train, loaded.num_val, loaded.num_test) == (45, 5, 50)  # val carved from train.
        train, val = rows(*loaded.arrays("train")), rows(*loaded.arrays("val"))
        assert not train & val
        x, y = next(iter(loaded.train_dataset(9, seed=0, epoch=0)))
        assert (x.dtype, y.dtype, x.shape[1:]) == (tf.float32, tf.int32, loaded.input_shape)
        assert loaded.arrays("train")[0].max() > 16  # Raw 0..255 pixels.


def test_tfds_unknown_and_not_prepared_fail_fast(tmp_path):
    with pytest.raises(InputError, match="--dataset: unknown dataset 'nosuchds'"):
        data.load(Config(dataset="nosuchds"))
    start = time.monotonic()
    with pytest.raises(InputError, match=r"not prepared.*tfds build cifar10 --data_dir DIR.*--download"):
        data.load(Config(dataset="cifar10", data_dir=str(tmp_path)))
    assert time.monotonic() - start < 30  # A bound on failing, not a performance assertion.


def write_folder(root, shapes):
    """Writes PNGs under root/<class>/; returns the written images per class."""
    rng = np.random.default_rng(2)
    written = {}
    for class_name, shape_list in shapes.items():
        os.makedirs(root / class_name)
        written[class_name] = []
        for i, shape in enumerate(shape_list):
            image = rng.integers(0, 256, shape, dtype=np.uint8)
            tf.io.write_file(str(root / class_name / f"{i}.png"), tf.io.encode_png(image))
            written[class_name].append(image)
    return written


def test_folder_source(tmp_path, capsys):
    written = write_folder(tmp_path / "images", {name: [(6, 5, 3)] * 12 for name in ("b_cat", "a_dog", "c_owl")})
    (tmp_path / "images" / "a_dog" / "notes.txt").write_text("not an image")
    (tmp_path / "images" / "c_owl" / "labels.csv").write_text("not an image either")
    loaded = data.load(Config(dataset=f"folder:{tmp_path / 'images'}", val_fraction=0.25))
    assert capsys.readouterr().err == (f"--dataset: folder:{tmp_path / 'images'}: skipped 2 files that are not images "
                                       f"({', '.join(sources.IMAGE_EXTENSIONS)})\n")
    assert (loaded.class_names, loaded.input_shape, loaded.num_classes) == (["a_dog", "b_cat", "c_owl"], (6, 5, 3), 3)
    assert (loaded.num_train, loaded.num_val, loaded.num_test) == (21, 7, 8)
    merged = sum((rows(*loaded.arrays(s)) for s in ("train", "val", "test")), collections.Counter())
    images = [image.astype(np.float32) for name in loaded.class_names for image in written[name]]
    assert merged == rows(images, [label for label in range(3) for _ in range(12)])


def test_folder_errors_name_the_file_or_folder(tmp_path):
    with pytest.raises(InputError, match="is not a directory"):
        data.load(Config(dataset=f"folder:{tmp_path / 'missing'}"))
    write_folder(tmp_path / "mixed", {"a": [(4, 4, 3)] * 2, "b": [(4, 4, 3), (5, 4, 3)]})
    with pytest.raises(InputError, match=r"b/1\.png has shape \(5, 4, 3\); expected \(4, 4, 3\)"):
        data.load(Config(dataset=f"folder:{tmp_path / 'mixed'}"))
    write_folder(tmp_path / "corrupt", {"a": [(4, 4, 3)] * 2, "b": [(4, 4, 3)]})
    (tmp_path / "corrupt" / "b" / "2.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(InputError, match=r"cannot decode image .*b/2\.png: Unknown image file format\. .*required\.$"):
        data.load(Config(dataset=f"folder:{tmp_path / 'corrupt'}"))
    write_folder(tmp_path / "empty", {"a": [(4, 4, 3)] * 2, "b": []})
    with pytest.raises(InputError, match=r"class folder .*empty/b holds no images"):
        data.load(Config(dataset=f"folder:{tmp_path / 'empty'}"))


def test_fewer_than_two_classes_is_refused_in_every_source(tmp_path):
    write_folder(tmp_path / "one", {"a": [(4, 4, 3)] * 6})
    for input_mode in ("memory", "stream"):
        with pytest.raises(InputError, match=r"folder:.*one has 1 class \(a\); a classifier needs at least 2"):
            data.count(Config(dataset=f"folder:{tmp_path / 'one'}", input=input_mode))
        with pytest.raises(InputError, match=r"folder:.*one has 1 class"):
            loading.load(Config(dataset=f"folder:{tmp_path / 'one'}", input=input_mode))
    # Two class names, but every training example is of one class.
    one_label = write_npz(tmp_path / "a.npz", x_train=np.ones((20, 3, 3)), y_train=np.ones(20, int),
                          x_test=np.ones((4, 3, 3)), y_test=np.arange(4) % 2)
    with pytest.raises(InputError, match=r"training split of npz:.*a\.npz holds examples of only one class \(1\)"):
        data.load(Config(dataset=one_label))


def test_corrupt_npz_is_one_error_naming_the_file(tmp_path):
    arrays = dict(x_train=np.random.default_rng(0).random((50, 8, 8)), y_train=np.arange(50) % 2,
                  x_test=np.zeros((4, 8, 8)), y_test=np.arange(4) % 2)
    for name, save in (("plain", np.savez), ("compressed", np.savez_compressed)):
        save(tmp_path / f"{name}.npz", **arrays)
        whole = (tmp_path / f"{name}.npz").read_bytes()
        damaged = bytearray(whole)
        damaged[1000:1100] = bytes(100)  # inside x_train's data: a bad CRC, or a broken deflate stream
        for kind, contents in (("truncated", whole[: len(whole) // 2]), ("short", whole[:-30]),
                               ("damaged", bytes(damaged))):
            path = tmp_path / f"{name}-{kind}.npz"
            path.write_bytes(contents)
            with pytest.raises(InputError, match=rf"--dataset: npz:{path} is (corrupt|not a NumPy .npz archive, or "
                                                 r"is truncated)"):
                data.load(Config(dataset=f"npz:{path}"))
            if kind != "damaged":  # counting reads only the labels, which the damage leaves intact
                with pytest.raises(InputError, match=rf"npz:{path}"):
                    data.count(Config(dataset=f"npz:{path}"))


def test_npz_source(tmp_path):
    rng = np.random.default_rng(3)
    x, y = rng.random((40, 6, 6)) * 255, (np.arange(40) % 4).astype(np.uint8)
    with_val = write_npz(tmp_path / "a.npz", x_train=x[:30], y_train=y[:30].reshape(-1, 1), x_val=x[30:35],
                         y_val=y[30:35], x_test=x[35:], y_test=y[35:], class_names=np.array(list("abcd")))
    loaded = data.load(Config(dataset=with_val))
    assert (loaded.input_shape, loaded.class_names, loaded.num_train, loaded.num_val, loaded.num_test) == (
        (6, 6, 1), list("abcd"), 30, 5, 5)
    assert np.array_equal(loaded.arrays("val")[0], x[30:35, :, :, None].astype(np.float32))
    carved = data.load(Config(dataset=write_npz(tmp_path / "b.npz", x_train=x[:30], y_train=y[:30],
                                                x_test=x[35:], y_test=y[35:])))
    assert (carved.num_train, carved.num_val, carved.class_names) == (27, 3, ["0", "1", "2", "3"])
    train, val = rows(*carved.arrays("train")), rows(*carved.arrays("val"))
    assert not train & val and train + val == rows(x[:30, :, :, None].astype(np.float32), y[:30])


def test_count_gives_the_split_sizes_of_load_without_decoding(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    x, y = rng.random((47, 5, 5)) * 255, (np.arange(47) % 3).astype(np.uint8)
    configs = [Config(), Config(val_fraction=0.37),
               Config(dataset=write_npz(tmp_path / "a.npz", x_train=x[:30], y_train=y[:30], x_val=x[30:37],
                                        y_val=y[30:37], x_test=x[37:], y_test=y[37:])),
               Config(dataset=write_npz(tmp_path / "b.npz", x_train=x[:41], y_train=y[:41].reshape(-1, 1),
                                        x_test=x[41:], y_test=y[41:]), val_fraction=0.15)]
    write_folder(tmp_path / "images", {name: [(4, 4, 3)] * n for name, n in (("a", 13), ("b", 9), ("c", 11))})
    configs.append(Config(dataset=f"folder:{tmp_path / 'images'}", val_fraction=0.2))
    expected = []
    for config in configs:
        loaded = data.load(config)
        expected.append((loaded.num_train, loaded.num_val, loaded.num_test))
    monkeypatch.setattr(sources, "decode_image", None)  # counting must not decode an image
    assert [data.count(config) for config in configs] == expected
    assert expected[0] == (1293, 144, 360)


def npz_arrays(**changes):
    arrays = dict(x_train=np.zeros((4, 3, 3)), y_train=np.zeros(4, int), x_test=np.zeros((2, 3, 3)),
                  y_test=np.zeros(2, int))
    return {key: value for key, value in {**arrays, **changes}.items() if value is not None}


@pytest.mark.parametrize(
    "arrays, message",
    [
        (npz_arrays(x_test=None, y_test=None), r"lacks x_test, y_test; it needs"),
        (npz_arrays(x_val=np.zeros((2, 3, 3))), r"lacks y_val"),
        (npz_arrays(y_train=np.zeros(3, int)), r"y_train has shape \(3,\) for x_train of shape \(4, 3, 3\)"),
        (npz_arrays(y_train=np.zeros(4)), r"y_train must hold integer class ids"),
        (npz_arrays(y_train=-np.ones(4, int)), r"y_train must hold integer class ids >= 0"),
        (npz_arrays(x_test=np.zeros((2, 3, 4))), r"images of different shapes across splits"),
        (npz_arrays(x_train=np.full((4, 3, 3), np.nan)), r"x_train holds NaN"),
        (npz_arrays(x_train=np.zeros(4)), r"x_train is float64 \(4,\); it must be numeric \(N, H, W\)"),
        (npz_arrays(x_train=np.array([None] * 4, dtype=object)), r"holds pickled Python objects"),
        (npz_arrays(x_train=np.zeros((1, 3, 3)), y_train=np.zeros(1, int)), r"too few examples \(1\) to split"),
    ],
)
def test_npz_errors_name_the_file(tmp_path, arrays, message):
    source = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InputError, match=f"npz:{tmp_path / 'bad.npz'}.*{message}"):
        data.load(Config(dataset=source))


def test_unknown_or_unreadable_sources(tmp_path):
    accepted = "use digits, a TFDS image-classification name .* folder:PATH or npz:PATH"
    with pytest.raises(InputError, match=f"--dataset: unknown dataset 'csv:/tmp/x' .*; {accepted}"):
        data.load(Config(dataset="csv:/tmp/x"))
    with pytest.raises(InputError, match=r"unknown dataset 'cifar10:9\.9\.9' .*only: 3\.0\.2"):
        data.load(Config(dataset="cifar10:9.9.9"))
    with pytest.raises(InputError, match=f"'imdb_reviews' is not an image classification dataset; {accepted}"):
        data.load(Config(dataset="imdb_reviews"))
    with pytest.raises(InputError, match="--dataset: cannot read npz:.*missing.npz"):
        data.load(Config(dataset=f"npz:{tmp_path / 'missing.npz'}"))
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(InputError, match="one.npy is one array"):
        data.load(Config(dataset=f"npz:{tmp_path / 'one.npy'}"))
    (tmp_path / "junk.npz").write_text("not numpy")
    with pytest.raises(InputError, match="junk.npz is not a NumPy .npz archive"):
        data.load(Config(dataset=f"npz:{tmp_path / 'junk.npz'}"))
