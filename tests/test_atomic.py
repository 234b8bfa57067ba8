"""Crash-safe saves: whatever fails during `save_pretrained` (an exception halfway through the
weights, a full disk, a bad argument, SIGKILL at any instant), the directory holds the old complete
checkpoint or the new one, never a mix; the user's other files in it survive a save."""

from __future__ import annotations

import errno
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from core_helpers import logits, tiny_llama, tokens

import moeify
from moeify import atomic
from moeify.hub.load import from_pretrained


def converted(seed: int) -> torch.nn.Module:
    model = tiny_llama(seed=seed, hidden_size=64, intermediate_size=128, num_hidden_layers=4)
    return moeify.moeify(model, num_experts=4, seed=seed)


def outputs(directory: Path) -> torch.Tensor:
    return logits(from_pretrained(directory), tokens())


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.parent.iterdir() if p.name.startswith(f".{directory.name}."))


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    """A directory holding checkpoint A, and A's outputs."""
    directory = tmp_path / "ckpt"
    moeify.save_pretrained(converted(0), directory, max_shard_size="300KB")
    return directory, outputs(directory)


@pytest.mark.parametrize("failure", ["midway", "disk_full"])
def test_a_save_that_fails_halfway_leaves_the_old_checkpoint(
    saved, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    directory, before = saved
    files = sorted(p.name for p in directory.iterdir())
    from huggingface_hub import save_torch_state_dict

    def failing(state_dict: dict, save_directory: Path, **kwargs) -> None:
        half = dict(list(state_dict.items())[: len(state_dict) // 2])
        save_torch_state_dict(half, save_directory, **kwargs)  # some shards are on disk already
        if failure == "disk_full":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("the writer failed")

    monkeypatch.setattr("huggingface_hub.save_torch_state_dict", failing)
    with pytest.raises((OSError, RuntimeError)):
        moeify.save_pretrained(converted(1), directory, max_shard_size="300KB")
    assert sorted(p.name for p in directory.iterdir()) == files
    assert torch.equal(outputs(directory), before)
    assert leftovers(directory) == []  # the staging directory is gone


def test_a_bad_argument_is_refused_before_anything_is_written(saved) -> None:
    directory, before = saved
    stamp = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    for size in ("5 gigs", -1, 0, True, 3.5):
        with pytest.raises(ValueError, match="max_shard_size"):
            moeify.save_pretrained(converted(1), directory, max_shard_size=size)
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == stamp
    assert torch.equal(outputs(directory), before)


def test_a_new_save_replaces_the_checkpoint_and_keeps_the_users_files(saved) -> None:
    directory, _ = saved
    assert len(list(directory.glob("moeify_model-*.safetensors"))) > 1  # sharded at first
    (directory / "README.md").write_text("my card")
    (directory / "tokenizer").mkdir()
    (directory / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    model = converted(1)
    moeify.save_pretrained(model, directory)  # one file now
    assert not list(directory.glob("moeify_model-*.safetensors"))  # no stale shard of the old save
    assert (directory / "README.md").read_text() == "my card"
    assert (directory / "tokenizer" / "vocab.txt").read_text() == "a\nb\n"
    assert torch.equal(outputs(directory), logits(model, tokens()))
    assert leftovers(directory) == []


def test_without_an_atomic_exchange_the_two_renames_recover(saved, monkeypatch: pytest.MonkeyPatch) -> None:
    """Filesystems without renameat2(RENAME_EXCHANGE): the old directory is renamed aside, the new
    one in. A crash between the two renames leaves the old one aside: the next load puts it back."""
    directory, before = saved
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    model = converted(1)
    moeify.save_pretrained(model, directory)
    assert torch.equal(outputs(directory), logits(model, tokens()))
    assert leftovers(directory) == []
    # The crash between the renames, reproduced: the checkpoint aside, nothing at the path.
    os.replace(directory, atomic._aside(directory))
    assert torch.equal(outputs(directory), logits(model, tokens()))  # from_pretrained recovers it
    assert leftovers(directory) == []


def _save_forever(directory: Path, models: list[torch.nn.Module]) -> None:
    """The child: save the two models in turn, forever, until it is killed."""
    try:
        while True:
            for model in models:
                moeify.save_pretrained(model, directory, max_shard_size="200KB")
    finally:
        os._exit(0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_at_any_moment_leaves_a_whole_checkpoint(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    models = [converted(0), converted(1)]
    expected = [logits(m, tokens()) for m in models]
    moeify.save_pretrained(models[0], directory, max_shard_size="200KB")
    started = time.perf_counter()
    moeify.save_pretrained(models[1], directory, max_shard_size="200KB")
    one_save = time.perf_counter() - started
    rng = random.Random(0)
    seen = set()
    for _ in range(8):
        pid = os.fork()
        if pid == 0:
            _save_forever(directory, models)
        time.sleep(rng.uniform(0.0, 2.5 * one_save))  # anywhere in one of the next saves
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        got = outputs(directory)
        match = [i for i, e in enumerate(expected) if torch.equal(got, e)]
        assert len(match) == 1, "the directory holds neither whole checkpoint"
        seen.add(match[0])
        assert not [n for n in leftovers(directory) if atomic.PREVIOUS in n]
    assert seen  # (which of the two depends on when the kill came)
