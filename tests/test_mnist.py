"""The dataset over IDX files: values, shapes, and clear errors for missing or broken files."""

import numpy as np
import pytest
import torch

from conftest import synthetic_digits, write_idx
from mnist import MNIST, MNISTFormatError, to_float, to_uint8


def test_items_are_floats_in_minus_one_one(mnist_root):
    ds, val = MNIST(mnist_root, "train"), MNIST(mnist_root, "val")
    images, labels = synthetic_digits(256, 0)
    assert len(ds) + len(val) == 256 and len(val) == 256 // 12 and ds.images.dtype == torch.uint8
    assert torch.equal(val.images, torch.from_numpy(images[-len(val):]))  # the last twelfth, never trained on
    x, y = ds[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert y == labels[3]
    assert torch.equal(to_uint8(x)[0], torch.from_numpy(images[3]))  # exact round trip
    assert to_float(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]
    assert len(MNIST(mnist_root, "test")) == 64


def test_missing_files_say_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="mnist_downloader.py"):
        MNIST(str(tmp_path), "train")


def test_bad_magic_number(mnist_root):
    write_idx(f"{mnist_root}/train-images-idx3-ubyte", 2049, np.zeros((4, 28, 28)))
    with pytest.raises(MNISTFormatError, match="magic number 2049, expected 2051"):
        MNIST(mnist_root, "train")


@pytest.mark.parametrize("keep", [10, 16 + 28 * 28 * 3 + 5])
def test_truncated_file(mnist_root, keep):
    path = f"{mnist_root}/train-images-idx3-ubyte"
    data = open(path, "rb").read()
    open(path, "wb").write(data[:keep])
    with pytest.raises(MNISTFormatError, match="truncated"):
        MNIST(mnist_root, "train")


def test_label_count_mismatch(mnist_root):
    write_idx(f"{mnist_root}/train-labels-idx1-ubyte", 2049, np.zeros(7))
    with pytest.raises(MNISTFormatError, match="256 images but 7 labels"):
        MNIST(mnist_root, "train")


def test_unknown_split(mnist_root):
    with pytest.raises(ValueError, match="split"):
        MNIST(mnist_root, "validation")
