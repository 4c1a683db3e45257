"""fileio.py's atomic writes where folders cannot be flushed (Windows)."""

import os

import torch

import fileio


def test_atomic_write_works_where_a_folder_cannot_be_opened(tmp_path, monkeypatch):
    """On Windows os.open of a folder raises PermissionError; every file (checkpoints, images, logs)
    is written through atomic_write, so it must not try."""
    real_open = os.open

    def windows_open(path, flags, *args):
        if os.path.isdir(path):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args)

    with monkeypatch.context() as m:  # os.name is back before pytest reports a failure
        m.setattr(os, "name", "nt")
        m.setattr(os, "open", windows_open)
        fileio.atomic_write(str(tmp_path / "a.txt"), lambda f: f.write(b"old"))
        fileio.atomic_write(str(tmp_path / "a.txt"), lambda f: f.write(b"new"))
        fileio.save_checkpoint(str(tmp_path / "run" / "last.pt"), {"step": 3})
    assert (tmp_path / "a.txt").read_bytes() == b"new"
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True) == {"step": 3}
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "run"] and os.listdir(tmp_path / "run") == ["last.pt"]
