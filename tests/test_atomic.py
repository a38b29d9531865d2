"""bbam.atomic: all-or-nothing writes, no temp files left behind, the formats callers rely on."""

import json
import os

import pytest
import torch

from bbam.atomic import (
    atomic_torch_save,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)

torch.set_num_threads(1)


def test_replaces_content_and_creates_parent(tmp_path):
    path = tmp_path / "new" / "dir" / "f.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(path.parent) == ["f.bin"]


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")

    def boom(handle):
        handle.write(b"partial")
        raise KeyboardInterrupt  # BaseException too, like a killed job

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, boom)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_permissions_follow_umask(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_text_is_utf8_without_newline_translation(tmp_path):
    path = tmp_path / "f.csv"
    atomic_write_text(path, "a,ü\r\nb\n")
    assert path.read_bytes() == "a,ü\r\nb\n".encode()


def test_json_is_compact(tmp_path):
    path = tmp_path / "f.json"
    obj = {"b": [1, 2], "a": "x"}
    atomic_write_json(path, obj)
    assert path.read_text() == '{"b":[1,2],"a":"x"}'
    assert json.loads(path.read_text()) == obj


def test_torch_save_round_trip(tmp_path):
    path = tmp_path / "ckpt.pt"
    state = {"w": torch.arange(5.0), "epoch": 3}
    atomic_torch_save(state, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(loaded["w"], state["w"])
    assert os.listdir(tmp_path) == ["ckpt.pt"]
