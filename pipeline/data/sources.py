"""Dataset sources read into memory: bundled digits, TFDS, a folder of images per class, an .npz archive.

The checks of a TFDS dataset and of a folder: (tfds_builder, class_files, read_image) serve pipeline/data/streamed.py too.

Each returns ({split: (images, labels)}, class_names) with images (N, H, W, C) uint8 or float32 raw pixels and
int32 labels; splits the source lacks are carved out with hold_out (stratified, under the constant SPLIT_SEED),
as pipeline.data.in_memory and pipeline.data.streamed do; channel_stats and resolve_augmentation serve both too.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import zipfile
import zlib

import numpy as np
import tensorflow as tf
from sklearn.model_selection import train_test_split

from pipeline.config import Config, InputError

SPLIT_SEED = 1234  # Decides which examples are train, val and test; constant so that --seed never moves them.
TEST_FRACTION = 0.2  # Share of all examples held out for test when a source has no test split.

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
ACCEPTED = "digits, a TFDS image-classification name (cifar10, mnist, fashion_mnist, ...), folder:PATH or npz:PATH"
SPLITS = ("train", "val", "test")
# What NumPy raises for a truncated or corrupt .npz: no zip directory, a bad CRC, a broken deflate stream, a short
# array, and (ValueError) a file that is no archive at all, which NumPy takes for a pickle and refuses.
NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def decode_image(contents: tf.Tensor) -> tf.Tensor:
    """Decodes PNG, JPEG, BMP, GIF (its first frame) or WebP bytes to a uint8 (H, W, C) image."""
    return tf.io.decode_image(contents, expand_animations=False)


def digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32)[..., np.newaxis]  # (1797, 8, 8, 1), values 0..16.
    return {"train": (images, digits.target.astype(np.int32))}, [str(d) for d in range(10)]


def tfds_builder(name: str, config: Config):
    """The TFDS builder of an image-classification dataset, its class names and {our split: TFDS split}.

    Raises:
        InputError: an unknown name, or a dataset that is not image classification with images of one size.
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=config.data_dir or None)
    except (ValueError, AssertionError) as e:  # An unknown name, or a version or config the dataset lacks.
        raise InputError(f"--dataset: unknown dataset {name!r} ({str(e).splitlines()[0]}); use {ACCEPTED}") from None
    info = builder.info
    image_key, label_key = info.supervised_keys if info.supervised_keys else (None, None)
    image = info.features[image_key] if isinstance(image_key, str) else None
    label = info.features[label_key] if isinstance(label_key, str) else None
    if not isinstance(image, tfds.features.Image) or not isinstance(label, tfds.features.ClassLabel):
        raise InputError(f"--dataset: TFDS dataset {name!r} is not an image classification dataset; use {ACCEPTED}")
    if None in image.shape:
        raise InputError(f"--dataset: TFDS dataset {name!r} has images of varying size {image.shape}; resize them "
                         "and pass folder:PATH or npz:PATH")
    return builder, list(label.names), _tfds_splits(name, info)


@contextlib.contextmanager
def tfds_prepared(name: str, config: Config):
    """Turns TFDS's ways of saying that the data is not prepared (and may not be downloaded) into an InputError."""
    try:
        yield
    # AssertionError: not prepared and no --download; KeyError: an empty version folder.
    except (AssertionError, KeyError):
        where = config.data_dir or "the TFDS default directory (~/tensorflow_datasets)"
        raise InputError(
            f"--dataset: TFDS dataset {name!r} is not prepared in {where}; on a machine with network run "
            f"`tfds build {name} --data_dir DIR`, copy DIR here and pass --data-dir DIR, or pass --download"
        ) from None


def tfds_dataset(name: str, config: Config):
    import tensorflow_datasets as tfds

    _, class_names, wanted = tfds_builder(name, config)
    with tfds_prepared(name, config):
        datasets = tfds.load(name, split=list(wanted.values()), as_supervised=True, data_dir=config.data_dir or None,
                             download=config.download)
    splits = {}
    for split, dataset in zip(wanted, datasets):
        batches = list(tfds.as_numpy(dataset.batch(4096)))
        images, labels = zip(*batches)
        splits[split] = (np.concatenate(images), np.concatenate(labels).astype(np.int32))
    return splits, class_names


def _tfds_splits(name: str, info) -> dict[str, str]:
    """{our split: TFDS split}: train, test (or validation as test), and validation as val when there is a test."""
    available = set(info.splits) or {"train", "test"}  # A builder that is not prepared (or is mocked) lists none.
    if "train" not in available:
        raise InputError(f"--dataset: TFDS dataset {name!r} has no train split, only {', '.join(sorted(available))}")
    wanted = {"train": "train"}
    if "test" in available:
        wanted["test"] = "test"
        if "validation" in available:
            wanted["val"] = "validation"
    elif "validation" in available:
        wanted["test"] = "validation"
    return wanted


def class_files(path: str, report_skipped: bool = False) -> dict[str, list[str]]:
    """{class name: its image files, sorted} of a folder: dataset, classes sorted by name.

    report_skipped: say in one line on stderr how many files were skipped as not images (the loaders do, once).

    Raises:
        InputError: no folder, fewer than 2 class subfolders, or a class without images.
    """
    if not os.path.isdir(path):
        raise InputError(f"--dataset: folder:{path} is not a directory; folder:PATH needs one subfolder per class")
    class_names = sorted(d for d in os.listdir(path) if not d.startswith(".") and os.path.isdir(os.path.join(path, d)))
    if not class_names:
        raise InputError(f"--dataset: folder:{path} has no class subfolders; put each class's images in its own one")
    check_classes(class_names, f"folder:{path}")
    classes, skipped = {}, 0
    for class_name in class_names:
        folder = os.path.join(path, class_name)
        names = [f for f in os.listdir(folder) if not f.startswith(".")]
        files = sorted(f for f in names if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise InputError(f"--dataset: class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        skipped += len(names) - len(files)
        classes[class_name] = [os.path.join(folder, f) for f in files]
    if skipped and report_skipped:
        print(f"--dataset: folder:{path}: skipped {skipped} files that are not images ({', '.join(IMAGE_EXTENSIONS)})",
              file=sys.stderr)
    return classes


def check_classes(class_names: list[str], source: str, train_labels: np.ndarray | None = None) -> None:
    """Raises InputError unless the source has at least 2 classes, and its training split examples of 2."""
    if len(class_names) < 2:
        raise InputError(f"--dataset: {source} has {len(class_names)} class ({', '.join(class_names)}); a classifier "
                         "needs at least 2")
    if train_labels is not None and len(np.unique(train_labels)) < 2:
        raise InputError(f"--dataset: the training split of {source} holds examples of only one class "
                         f"({class_names[int(train_labels[0])]}); a classifier needs at least 2")


def split_sizes(source: str, config: Config) -> dict[str, int] | None:
    """Examples in each split that the source provides, read without decoding images; None when only loading tells
    (a TFDS dataset that is not prepared)."""
    if source == "digits":
        return {"train": len(digits()[0]["train"][1])}
    if source.startswith("folder:"):
        return {"train": sum(map(len, class_files(source.removeprefix("folder:")).values()))}
    if source.startswith("npz:"):
        path = source.removeprefix("npz:")
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {s: len(archive[f"y_{s}"]) for s in SPLITS if f"y_{s}" in archive.files}
        except (*NPZ_ERRORS, TypeError, AttributeError):
            return None  # loading says what is wrong
    import tensorflow_datasets as tfds

    try:
        info = tfds.builder(source, data_dir=config.data_dir or None).info
        splits = {split: info.splits[name].num_examples for split, name in _tfds_splits(source, info).items()}
    except Exception:  # noqa: BLE001 -- unknown, not prepared or mocked: loading says what is wrong
        return None
    return splits if all(splits.values()) else None


def read_image(file: str, like: tuple[str, tuple] | None = None) -> np.ndarray:
    """Decodes one image file of a folder: dataset to a uint8 (H, W, C) array.

    Args:
        file: the image's path.
        like: (another file, its shape) that this image must match, or None.

    Raises:
        InputError: naming the file, when it cannot be decoded or has another shape.
    """
    try:
        image = decode_image(tf.io.read_file(file)).numpy()
    except tf.errors.OpError as e:
        reason = re.sub(r"\{\{.*?\}\}|\[Op:.*", "", e.message.splitlines()[0]).strip()  # Drop TF's op names.
        raise InputError(f"--dataset: cannot decode image {file}: {reason}") from None
    if like and image.shape != like[1]:
        raise InputError(f"--dataset: image {file} has shape {image.shape}; expected {like[1]} like {like[0]}")
    return image


def folder(path: str):
    classes, images, labels, first = class_files(path, report_skipped=True), [], [], None
    for label, files in enumerate(classes.values()):
        for file in files:
            image = read_image(file, first)
            first = first or (file, image.shape)
            images.append(image)
            labels.append(label)
    return {"train": (np.stack(images), np.array(labels, np.int32))}, list(classes)


def npz(path: str):
    try:
        archive = np.load(path, allow_pickle=False)
    except OSError as e:
        raise InputError(f"--dataset: cannot read npz:{path}: {e.strerror or e}") from None
    except (ValueError, zipfile.BadZipFile):  # NumPy takes a file that is neither .npy nor .npz for a pickle.
        raise InputError(f"--dataset: npz:{path} is not a NumPy .npz archive, or is truncated; write one with "
                         "np.savez") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InputError(f"--dataset: npz:{path} is one array; save x_train, y_train, x_test, y_test with np.savez")
    with archive:
        keys = set(archive.files)
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in keys]
        if ("x_val" in keys) != ("y_val" in keys):
            missing.append("y_val" if "x_val" in keys else "x_val")
        if missing:
            raise InputError(f"--dataset: npz:{path} lacks {', '.join(missing)}; it needs x_train, y_train, x_test, "
                             "y_test (x_val, y_val and class_names optional)")
        try:
            arrays = {key: archive[key] for key in keys}
        except ValueError as e:  # allow_pickle=False refuses object arrays; a short array cannot be reshaped.
            if "allow_pickle" in str(e):
                raise InputError(f"--dataset: npz:{path} holds pickled Python objects; save numeric arrays") from None
            raise InputError(f"--dataset: npz:{path} is corrupt ({str(e).splitlines()[0]}); write it again with "
                             "np.savez") from None
        except NPZ_ERRORS as e:
            raise InputError(f"--dataset: npz:{path} is corrupt ({type(e).__name__}: {str(e).splitlines()[0]}); "
                             "write it again with np.savez") from None
    splits = {s: _npz_split(arrays[f"x_{s}"], arrays[f"y_{s}"], s, path) for s in SPLITS if f"x_{s}" in keys}
    class_names = [str(c) for c in arrays["class_names"]] if "class_names" in keys else None
    shapes = {s: x.shape[1:] for s, (x, _) in splits.items()}
    if len(set(shapes.values())) > 1:
        raise InputError(f"--dataset: npz:{path} has images of different shapes across splits: {shapes}")
    num_classes = max(int(y.max()) for _, y in splits.values()) + 1
    if class_names is not None and len(class_names) < num_classes:
        raise InputError(f"--dataset: npz:{path} has labels up to {num_classes - 1} but only {len(class_names)} "
                         "class_names")
    return splits, class_names or [str(c) for c in range(num_classes)]


def _npz_split(x: np.ndarray, y: np.ndarray, split: str, path: str):
    where = f"--dataset: npz:{path}"
    if x.dtype.kind not in "uif" or x.ndim not in (3, 4):
        raise InputError(f"{where}: x_{split} is {x.dtype} {x.shape}; it must be numeric (N, H, W) or (N, H, W, C)")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise InputError(f"{where}: x_{split} holds NaN or infinite values")
    y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y  # Keras' datasets store labels as (N, 1).
    if y.ndim != 1 or len(y) != len(x) or len(y) == 0:
        raise InputError(f"{where}: y_{split} has shape {y.shape} for x_{split} of shape {x.shape}; it needs one "
                         "label per image and at least one image")
    if y.dtype.kind not in "iu" or y.min() < 0:
        raise InputError(f"{where}: y_{split} must hold integer class ids >= 0, got {y.dtype} from {y.min()}")
    x = x[..., np.newaxis] if x.ndim == 3 else x
    return (x if x.dtype == np.uint8 else x.astype(np.float32)), y.astype(np.int32)


def hold_out(images, labels, fraction: float, source: str):
    """Splits off `fraction` of the examples, stratified by label where every class has enough examples."""
    indices = np.arange(len(labels))
    for stratify in (labels, None):  # sklearn refuses to stratify a class of one, or fewer held out than classes.
        try:
            keep, held = train_test_split(indices, test_size=fraction, random_state=SPLIT_SEED, stratify=stratify)
            break
        except ValueError:
            continue
    else:
        raise InputError(f"--dataset: {source} has too few examples ({len(labels)}) to split {fraction:.0%} off")
    keep, held = np.sort(keep), np.sort(held)
    return (images[keep], labels[keep]), (images[held], labels[held])


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population variance over (N, H, W), accumulated in float64 in chunks."""
    mean = images.mean(axis=(0, 1, 2), dtype=np.float64)
    squares = sum(
        ((images[i : i + 4096] - mean) ** 2).sum(axis=(0, 1, 2)) for i in range(0, len(images), 4096)
    )
    return mean.astype(np.float32), (squares / (images.size // images.shape[-1])).astype(np.float32)


def resolve_augmentation(augment: str, shape: tuple[int, ...]) -> str:
    """--augment auto: crop-flip for images of at least 32x32 with 3 channels, none otherwise."""
    if augment == "auto":
        height, width, channels = shape
        return "crop-flip" if height >= 32 and width >= 32 and channels == 3 else "none"
    return augment
