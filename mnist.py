"""MNIST as a torch Dataset, read straight from the (decompressed) IDX files.

Splits: "train" is the first 55,000 images of MNIST's training file and "val" the last 5,000
(the usual 55k/5k split: the validation loss, best.pt and any tuning use "val", and training
never sees it); "test" is the official 10,000, kept for the final numbers. A smaller training
file (as in the tests) is split in the same proportion, its last twelfth held out.
The whole split is held in memory as uint8 (43 MB for train); items are float tensors of
shape (1, 28, 28) scaled to [-1, 1], the range the sampler clips to.
"""

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from configuration import ConfigError

SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
          "val": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000)}
VAL_SHARE = 12  # the last 1/12 of the training file (5,000 of 60,000) is the validation split
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # IDX: 0x0000 0x08 (ubyte) 0x03 / 0x01 (dims)


class MNISTFormatError(ConfigError):
    """An IDX file that is not what MNIST should be (a ConfigError: the scripts print it in one line)."""


def _read_idx(path, magic, dims):
    """Read an IDX ubyte file, checking magic number, header and payload size."""
    data = np.fromfile(path, dtype=np.uint8)
    header = 4 * (1 + dims)
    if data.size < header:
        raise MNISTFormatError(f"{path}: truncated header ({data.size} bytes); delete it and run "
                               "`python mnist_downloader.py` again")
    fields = data[:header].view(">u4").astype(int)
    if fields[0] != magic:
        raise MNISTFormatError(f"{path}: magic number {fields[0]}, expected {magic}: "
                               "not an MNIST IDX file of this kind")
    shape = tuple(fields[1:])
    if data.size - header != int(np.prod(shape)):
        raise MNISTFormatError(f"{path}: header says {shape} ({int(np.prod(shape))} bytes of data) "
                               f"but the file holds {data.size - header}; it is truncated or corrupt: "
                               "delete it and run `python mnist_downloader.py` again")
    return torch.from_numpy(data[header:].reshape(shape).copy())


class MNIST(Dataset):
    """MNIST split ("train" or "test"): images (N, 28, 28) uint8 and labels (N,) int64."""

    def __init__(self, root="data/mnist", split="train"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        image_file, label_file, expected = SPLITS[split]
        paths = [os.path.join(root, f) for f in (image_file, label_file)]
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"MNIST not found in {root} (missing {', '.join(missing)}): "
                                    f"run `python mnist_downloader.py --root {root}`")
        images = _read_idx(paths[0], IMAGES_MAGIC, 3)
        labels = _read_idx(paths[1], LABELS_MAGIC, 1).long()
        if images.shape[1:] != (28, 28):
            raise MNISTFormatError(f"{paths[0]}: images are {tuple(images.shape[1:])}, expected 28x28")
        if len(images) != len(labels):
            raise MNISTFormatError(f"{root}: {len(images)} images but {len(labels)} labels")
        if len(images) != expected:
            # Not fatal: tests and subsets use smaller files. Real MNIST has exactly `expected`.
            print(f"note: {paths[0]} holds {len(images)} images (official file: {expected})")
        if split != "test":
            first_val = len(images) - len(images) // VAL_SHARE
            part = slice(None, first_val) if split == "train" else slice(first_val, None)
            images, labels = images[part], labels[part]
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return to_float(self.images[i][None]), int(self.labels[i])


def to_float(images_uint8):
    """uint8 pixels in [0, 255] -> float in [-1, 1]."""
    return images_uint8.float() / 127.5 - 1.0


def to_uint8(images):
    """float in [-1, 1] -> uint8 pixels in [0, 255] (clipped)."""
    return ((images.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
