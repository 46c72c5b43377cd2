"""Atomic checkpoint writes, integrity checks and pruning (no model needed)."""

from __future__ import annotations

import logging

import pytest

from ftune.training import checkpoint as ckpt


def write_ckpt(root, step, payload=b"weights"):
    tmp = root / f".tmp-checkpoint-{step}"
    tmp.mkdir(parents=True)
    (tmp / "adapter_model.safetensors").write_bytes(payload)
    (tmp / "training_state.pt").write_bytes(b"state")
    return ckpt.finalize(tmp, root / f"checkpoint-{step}")


def test_finalize_renames_and_writes_manifest(tmp_path):
    path = write_ckpt(tmp_path, 5)
    assert path.name == "checkpoint-5" and not (tmp_path / ".tmp-checkpoint-5").exists()
    assert ckpt.verify(path) is None
    assert ckpt.step_of(path) == 5


def test_partial_checkpoint_is_skipped_for_previous_good_one(tmp_path, caplog):
    write_ckpt(tmp_path, 1)
    partial = tmp_path / "checkpoint-2"  # e.g. copied by hand or a foreign tool: no manifest
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"half")
    with caplog.at_level(logging.WARNING):
        assert ckpt.latest_valid(tmp_path).name == "checkpoint-1"
    assert "checkpoint-2" in caplog.text and "manifest" in caplog.text


def test_corrupted_file_fails_checksum(tmp_path, caplog):
    write_ckpt(tmp_path, 1)
    good_then_bad = write_ckpt(tmp_path, 2)
    (good_then_bad / "adapter_model.safetensors").write_bytes(b"weightz")  # same size, different bytes
    assert "checksum" in ckpt.verify(good_then_bad)
    with caplog.at_level(logging.WARNING):
        assert ckpt.latest_valid(tmp_path).name == "checkpoint-1"


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    first = write_ckpt(tmp_path, 1)
    before = {p.name: p.read_bytes() for p in first.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "replace", boom)
    with pytest.raises(OSError):
        write_ckpt(tmp_path, 2)
    monkeypatch.undo()
    assert not (tmp_path / "checkpoint-2").exists()
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert ckpt.latest_valid(tmp_path) == first
    ckpt.prune(tmp_path, keep_last=5)  # leftovers of the failed save are cleaned up
    assert not list(tmp_path.glob(".tmp-*"))


def test_prune_keeps_newest_complete(tmp_path):
    for step in (1, 2, 3, 10):
        write_ckpt(tmp_path, step)
    ckpt.prune(tmp_path, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-10"]


def test_no_checkpoint_returns_none(tmp_path):
    assert ckpt.latest_valid(tmp_path / "missing") is None
