"""train_util.py: the size of the validation split, and what a fresh run clears from its folder."""

import glob
import os

import pytest

import likelihood
import sample
import train
from configuration import ConfigError, load_config
from mnist import MNIST, VAL_SHARE
from train_util import Validator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_more_validation_samples_than_the_split_holds_is_a_config_error(tiny_config, mnist_root):
    held_out = len(MNIST(mnist_root, "val"))
    assert len(Validator(mnist_root, held_out, 20, "cpu").x0) == held_out
    with pytest.raises(ConfigError, match=rf"train.val_samples = {held_out + 1}, .* at most {held_out}$"):
        Validator(mnist_root, held_out + 1, 20, "cpu")
    with pytest.raises(ConfigError, match="train.val_samples"):  # before any training
        train.main(["--config", tiny_config, "--val", "True", f"--train.val_samples={held_out + 1}"])


def test_no_config_asks_for_more_validation_samples_than_mnist_holds():
    for path in glob.glob(os.path.join(REPO, "config", "*.yaml")):
        assert load_config(path)["train"]["val_samples"] <= 60000 // VAL_SHARE, path


def files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names)


def test_a_fresh_run_leaves_no_output_of_the_run_before(tiny_config, tmp_path, mnist_root):
    """Every file that the scripts write beside a checkpoint is gone after --overwrite: the folder
    then holds what a fresh run leaves in an empty one."""
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    cond = ["--model.num_classes=10", "--train.steps=2"]
    train.main(["--config", tiny_config, *cond, f"--train.out_dir={old}"])
    base = ["--config", tiny_config, "--ckpt", os.path.join(old, "last.pt"), "--data", mnist_root, "--steps", "2"]
    for mode in [[], ["--inpaint", "--images", "0", "--completions", "1"], ["--encode", "--images", "0"],
                 ["--interpolate", "0,1", "--frames", "2"], ["--every_digit", "--num_samples", "10"]]:
        sample.main(base + mode)
    likelihood.checkpoint_bound(os.path.join(old, "last.pt"), mnist_root, num_images=2, timesteps=1, progress=False,
                                log=lambda *a: None)
    written = files(old)
    for prefix in ["samples_", "inpaint_", "encode_", "interpolate_", "every_digit_", "nll_"]:
        assert any(f.startswith(prefix) for f in written), prefix
    train.main(["--config", tiny_config, *cond, f"--train.out_dir={old}", "--overwrite"])
    train.main(["--config", tiny_config, *cond, f"--train.out_dir={new}"])
    assert files(old) == files(new)
