"""Tests of pipeline.data.streamed (--input stream): the same splits and statistics as in memory, an order that is a
function of (seed, epoch), a cache that changes nothing but speed, sharding by file over workers, exact resume."""

import collections
import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from pipeline import config as config_lib
from pipeline import train as train_lib
from pipeline.config import Config
from pipeline.data import in_memory, loading

TRAIN, TEST, SHARDS = 40, 12, 4


class BatchscopeStreamTiny(tfds.core.GeneratorBasedBuilder):
    """A prepared TFDS dataset of TRAIN training images in SHARDS record files; image i is filled with value i."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(8, 8, 3)),
                                               "label": tfds.features.ClassLabel(num_classes=3)})
        return tfds.core.DatasetInfo(builder=self, features=features, supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, TRAIN), "test": self._generate_examples(100, TEST)}

    def _generate_examples(self, first, count):
        for i in range(first, first + count):
            yield i, {"image": np.full((8, 8, 3), i, np.uint8), "label": i % 3}


def rows(x, y):
    """A multiset of examples, each as (pixel bytes, label)."""
    return collections.Counter((xi.tobytes(), int(yi)) for xi, yi in zip(x, y))


def batches(dataset):
    return [(x.numpy(), y.numpy()) for x, y in dataset]


def same_batches(a, b):
    pairs = zip(a, b)
    return len(a) == len(b) and all(np.array_equal(xa, xb) and np.array_equal(ya, yb) for (xa, ya), (xb, yb) in pairs)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, write_image_folder):
    """folder:PATH of 3 classes of 10 different 32x32 colour PNG images."""
    return write_image_folder(tmp_path_factory.mktemp("images"), 10, (32, 32, 3), seed=0)


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
    """The data directory of BatchscopeStreamTiny, prepared offline."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    BatchscopeStreamTiny(data_dir=data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(num_shards=SHARDS))
    return data_dir


@pytest.fixture(scope="module")
def streamed(folder):
    return loading.load(Config(dataset=folder, input="stream"))


def test_folder_stream_has_the_splits_and_statistics_of_memory(folder, streamed):
    memory = in_memory.load(Config(dataset=folder))
    assert (streamed.num_train, streamed.num_val, streamed.num_test) == (memory.num_train, memory.num_val,
                                                                          memory.num_test)
    assert streamed.class_names == memory.class_names and streamed.input_shape == memory.input_shape == (32, 32, 3)
    for split in ("val", "test"):  # the same examples in the same order, so evaluation is the same
        assert all(np.array_equal(a, b) for a, b in zip(streamed.arrays(split), memory.arrays(split)))
    assert rows(*streamed.arrays("train")) == rows(*memory.arrays("train"))
    # Keras' adapt against data.py's float64 statistics of the same pixels.
    np.testing.assert_allclose(streamed.mean, memory.mean, rtol=1e-5)
    np.testing.assert_allclose(streamed.variance, memory.variance, rtol=1e-4)


def test_each_epoch_is_a_function_of_seed_and_epoch(streamed):
    epoch1 = batches(streamed.train_dataset(7, seed=3, augment=False, epoch=1))
    assert same_batches(epoch1, batches(streamed.train_dataset(7, seed=3, augment=False, epoch=1)))
    assert not same_batches(epoch1, batches(streamed.train_dataset(7, seed=3, augment=False, epoch=2)))
    assert not same_batches(epoch1, batches(streamed.train_dataset(7, seed=4, augment=False, epoch=1)))
    # The 21 training examples in 3 batches of 7: each epoch is a permutation of the split.
    assert len(epoch1) == 3 and rows(*map(np.concatenate, zip(*epoch1))) == rows(*streamed.arrays("train"))
    streamed.set_epoch(1)  # the dataset that fit gets reads the epoch when it is iterated
    assert same_batches(epoch1, batches(streamed.train_dataset(7, seed=3, augment=False)))
    augmented = batches(streamed.train_dataset(7, seed=3, epoch=1))
    assert same_batches(augmented, batches(streamed.train_dataset(7, seed=3, epoch=1)))
    assert [y.tolist() for _, y in augmented] == [y.tolist() for _, y in epoch1]  # augmentation keeps the order
    assert not all(np.array_equal(a, b) for (a, _), (b, _) in zip(augmented, epoch1))


@pytest.mark.slow
def test_one_iterator_over_several_epochs_gives_each_epochs_batches(streamed):
    # pipeline.train's input (one iterator for a fit call) against train_dataset epoch by epoch, also per worker.
    for context in (None, *contexts(2)):
        epochs = [batches(streamed.train_dataset(4, seed=3, epoch=e, input_context=context)) for e in (1, 2)]
        together = streamed.train_epochs(4, seed=3, first_epoch=1, epochs=3, input_context=context)
        assert together.cardinality() == 2 * (21 // 4) and same_batches(batches(together), epochs[0] + epochs[1])


@pytest.mark.slow
def test_a_cache_changes_the_speed_not_the_numbers(folder, streamed, tmp_path):
    cache_dir = tmp_path / "cache"
    cached = loading.load(Config(dataset=folder, input="stream", cache_dir=str(cache_dir)))
    files = sorted(os.listdir(cache_dir))
    assert sorted(f.split("-")[0] for f in files if f.endswith(".index")) == ["test", "train", "val"]
    assert not [f for f in files if "partial" in f]  # each cache is renamed into place whole
    for epoch in (0, 1):
        assert same_batches(batches(cached.train_dataset(7, seed=0, epoch=epoch)),
                            batches(streamed.train_dataset(7, seed=0, epoch=epoch)))
    cached.set_epoch(2)
    streamed.set_epoch(2)
    for context in contexts(2):  # a worker's shard is cached when its first epoch is built (in a traced function)
        assert same_batches(batches(cached.train_dataset(4, seed=0, input_context=context)),
                            batches(streamed.train_dataset(4, seed=0, input_context=context)))
    files = sorted(os.listdir(cache_dir))
    assert sorted(f.split("-", 2)[1] for f in files if f.startswith("train") and f.endswith(".index")) == [
        "0of1", "0of2", "1of2"]
    mtimes = {f: os.stat(cache_dir / f).st_mtime_ns for f in files}
    again = loading.load(Config(dataset=folder, input="stream", cache_dir=str(cache_dir)))
    assert {f: os.stat(cache_dir / f).st_mtime_ns for f in os.listdir(cache_dir)} == mtimes  # read, not rewritten
    assert all(np.array_equal(a, b) for a, b in zip(again.arrays("test"), streamed.arrays("test")))


def contexts(workers):
    return [tf.distribute.InputContext(num_input_pipelines=workers, input_pipeline_id=i, num_replicas_in_sync=workers)
            for i in range(workers)]


def test_two_workers_read_their_own_tfds_files(tiny_tfds):
    loaded = loading.load(Config(dataset="batchscope_stream_tiny", data_dir=tiny_tfds, input="stream", val_fraction=0.25))
    assert (loaded.num_train, loaded.num_val, loaded.num_test) == (30, 10, TEST)  # val: the last quarter of train
    builder = tfds.builder("batchscope_stream_tiny", data_dir=tiny_tfds)
    stored = [int(x[0, 0, 0]) for x, _ in builder.as_dataset("train", as_supervised=True).as_numpy_iterator()]
    assert sorted(stored) == list(range(TRAIN))  # TFDS stored the examples in an order of its own
    train, val = set(stored[:30]), set(stored[30:])
    assert {int(x[0, 0, 0]) for x, _ in loaded.read("val", None).as_numpy_iterator()} == val
    lengths = builder.info.splits["train"].shard_lengths
    assert len(lengths) == SHARDS
    files = [set(stored[sum(lengths[:k]):sum(lengths[:k + 1])]) for k in range(SHARDS)]
    seen = []
    for context in contexts(2):
        ids = {int(x[0, 0, 0]) for x, _ in loaded.read("train", context).as_numpy_iterator()}
        # Worker i reads whole files i, i + 2, ... (TFDS's file sharding), cut at the end of the train slice.
        assert ids == set().union(*files[context.input_pipeline_id::2]) & train
        seen.append(ids)
    assert not seen[0] & seen[1] and seen[0] | seen[1] == train


def test_two_workers_fill_their_share_of_each_global_batch_from_their_own_files(streamed):
    shards, steps = [], streamed.num_train // 4
    for context in contexts(2):
        x, y = map(np.concatenate, zip(*streamed.read("train", context).batch(64).as_numpy_iterator()))
        own = rows(x.astype(np.float32), y)
        shards.append(own)
        per_replica = batches(streamed.train_dataset(4, seed=0, augment=False, epoch=0, input_context=context))
        assert len(per_replica) == steps and all(len(y) == 2 for _, y in per_replica)
        assert set(rows(*map(np.concatenate, zip(*per_replica)))) <= set(own)
    assert not set(shards[0]) & set(shards[1])  # each image file is read by exactly one worker
    assert shards[0] + shards[1] == rows(*streamed.arrays("train"))


def test_tfds_stream_through_mock_data():
    with tfds.testing.mock_data(num_examples=40):
        loaded = loading.load(Config(dataset="mnist", input="stream"))
        x, y = next(iter(loaded.train_dataset(8, seed=0, epoch=0)))
        assert loaded.input_shape == (28, 28, 1) and loaded.num_classes == 10 and loaded.augmentation == "none"
        assert x.shape == (8, 28, 28, 1) and x.dtype == tf.float32 and y.dtype == tf.int32
        assert loaded.num_test == 40 and next(iter(loaded.eval_dataset("test", 16)))[0].shape == (16, 28, 28, 1)


@pytest.mark.parametrize("argv, message", [
    (["--input", "disk"], "--input: got 'disk'; choose one of memory, stream"),
    (["--input", "stream"], "--input: stream reads TFDS and folder:PATH datasets"),
    (["--dataset", "npz:x.npz", "--input", "stream"], "digits and npz:PATH are held in memory, use --input memory"),
    (["--cache-dir", "/tmp/c"], "--cache-dir: needs --input stream"),
    (["--dataset", "folder:/no/such/folder", "--input", "stream"], "--dataset: folder:/no/such/folder is not a "
                                                                    "directory"),
])
def test_bad_streaming_flags_are_one_line(cli_error, argv, message):
    assert message in cli_error(train_lib.main, argv)


def test_unwritable_cache_and_bad_image_are_one_line(cli_error, folder, tmp_path):
    (tmp_path / "file").write_text("")
    line = cli_error(train_lib.main, ["--dataset", folder, "--input", "stream", "--cache-dir",
                                      str(tmp_path / "file" / "cache"), "--run-dir", str(tmp_path / "run")])
    assert line.startswith(f"error: --cache-dir: cannot write to {tmp_path / 'file' / 'cache'}")
    root = tmp_path / "bad"
    for label in range(2):
        os.makedirs(root / f"c{label}")
        for i in range(6):
            tf.io.write_file(str(root / f"c{label}" / f"{i}.png"), tf.io.encode_png(np.zeros((8, 8, 1), np.uint8)))
    (root / "c1" / "5.png").write_bytes(b"not an image")
    line = cli_error(train_lib.main, ["--dataset", f"folder:{root}", "--input", "stream"])
    assert line.startswith(f"error: --dataset: cannot decode image {root / 'c1' / '5.png'}")


@pytest.mark.slow
def test_a_resumed_streaming_run_repeats_the_uninterrupted_one(folder, tmp_path, interrupt_after_first_epoch,
                                                                final_weights):
    """Epoch e is a function of (seed, epoch): interrupted after epoch 1 and resumed (with a cache this time), a run
    ends with the weights of the uninterrupted run, bit for bit."""
    base = dataclasses.replace(config_lib.smoke(), dataset=folder, input="stream", batch=7, deterministic=True,
                               grad_stats_every=0, bn_stats_every=0, dynamics=False, export=False, precise_bn_samples=0)
    whole = train_lib.train(dataclasses.replace(base, run_dir=str(tmp_path / "whole")))
    parts = dataclasses.replace(base, run_dir=str(tmp_path / "parts"))
    with interrupt_after_first_epoch():
        assert train_lib.train(parts).status == "interrupted"
    resumed = train_lib.train(dataclasses.replace(parts, resume=True, cache_dir=str(tmp_path / "cache")))
    assert whole.status == resumed.status == "completed" and resumed.steps == whole.steps == 2 * (21 // 7)
    arrays = [final_weights(run.run_dir) for run in (whole, resumed)]
    assert arrays[0].keys() == arrays[1].keys() and len(arrays[0]) > 4
    for key in arrays[0]:
        np.testing.assert_array_equal(arrays[0][key], arrays[1][key], err_msg=key)
