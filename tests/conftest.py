"""Shared fixtures: tiny synthetic MNIST files and a tiny config, all under tmp_path."""


import numpy as np
import pytest
import torch
import yaml

torch.set_num_threads(1)  # tiny models: a second thread only adds synchronisation


def write_idx(path, magic, array):
    """Write an IDX ubyte file: big-endian magic, dims, then the uint8 payload."""
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    with open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def synthetic_digits(n, seed):
    """n 28x28 uint8 images of 'digit' k: a bright bar at a class-dependent place, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 40, (n, 28, 28))
    for i, k in enumerate(labels):
        images[i, 4 + 2 * k:8 + 2 * k, 6:22] = 250
    return images.astype(np.uint8), labels.astype(np.uint8)


@pytest.fixture
def mnist_root(tmp_path):
    root = tmp_path / "mnist"
    root.mkdir()
    for prefix, n, seed in [("train", 256, 0), ("t10k", 64, 1)]:
        images, labels = synthetic_digits(n, seed)
        write_idx(root / f"{prefix}-images-idx3-ubyte", 2051, images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", 2049, labels)
    return str(root)


def randomised(model):
    """The model with every weight drawn at random, as training would leave it: the zero-initialised
    output layers of a fresh UNet make it predict 0 everywhere, which hides what a test looks for."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


TINY = {
    "model": {"channels": [8, 16], "attention": [False, True], "mid_attention": True, "num_heads": 2,
              "norm_groups": 4, "num_res_blocks": 1},
    "diffusion": {"num_timesteps": 20},
    "train": {"steps": 6, "batch_size": 16, "lr": 1e-3, "warmup_steps": 2, "eval_every": 3, "log_every": 1,
              "val_samples": 16, "num_threads": 1},
    "sample": {"sampler": "ddim", "steps": 4, "num_samples": 8},
}


@pytest.fixture
def tiny_config(tmp_path, mnist_root):
    """Path of a YAML config for a tiny model on the synthetic data, writing into tmp_path/run."""
    cfg = {section: dict(values) for section, values in TINY.items()}
    cfg["data"] = {"root": mnist_root, "verify": False}  # synthetic digits, not MNIST's files
    cfg["train"]["out_dir"] = str(tmp_path / "run")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)
