"""Checkpoints: identical behaviour after save/load, atomic writes, clear errors for bad files."""

import errno
import os
import random
import re

import pytest
import torch

from minigpt import checkpoint
from minigpt.device import resolve_device
from minigpt.errors import CheckpointError
from minigpt.checkpoint import load_model
from minigpt.generation import sample
from minigpt.training import train

from conftest import tiny_config, write_corpus


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """train_on(device): a short tiny run trained on that device, trained once per module and device."""
    runs = {}

    def train_on(device: str):
        if device not in runs:
            tmp = tmp_path_factory.mktemp(f"ckpt-{device}")
            corpus = write_corpus(tmp / "corpus.txt")
            runs[device] = train(tiny_config(tmp, corpus, "train.max_iters=20", "train.eval_interval=10",
                                             "train.warmup_iters=2", f"train.device={device}"), progress=False)
        return runs[device]
    return train_on


@pytest.fixture(scope="module")
def run(trained):
    return trained("cpu")


def test_save_load_gives_identical_logits_and_sample(trained, device, tmp_path):
    """A run trained on `device`, loaded there twice (once via a re-saved copy): same logits, same seeded sample."""
    run = trained(device.type)
    loaded = load_model(str(run.run_dir), resolve_device(device.type))
    copy = tmp_path / "copy.pt"
    payload = checkpoint.load(run.run_dir)
    checkpoint.save(copy, {k: v for k, v in payload.items() if k not in ("format", "version", "path")})
    again = load_model(str(copy), resolve_device(device.type))
    idx = torch.randint(0, loaded.tokenizer.vocab_size, (2, 16), device=device)
    assert torch.equal(loaded.model(idx)[0], again.model(idx)[0])
    a = sample(loaded, "All:", 40, 1.0, None, 1, seed=7)
    b = sample(again, "All:", 40, 1.0, None, 1, seed=7)
    assert a == b and a[0].startswith("All:") and len(a[0]) == 44
    assert set(a[0]) <= set(loaded.tokenizer.chars)
    # The same checkpoint on the CPU computes the same logits (up to kernel rounding), and samples there.
    on_cpu = load_model(str(run.run_dir), resolve_device("cpu"))
    torch.testing.assert_close(on_cpu.model(idx.cpu())[0], loaded.model(idx)[0].cpu(), rtol=1e-4, atol=1e-4)
    greedy = [sample(m, "All:", 40, 0.0, None, 1, seed=7) for m in (loaded, on_cpu)]
    assert greedy[0][0].startswith("All:") and len(greedy[1][0]) == 44


def test_checkpoint_is_self_contained_plain_data(run):
    payload = torch.load(run.run_dir / checkpoint.LAST, weights_only=True)  # no pickled classes
    assert payload["format"] == checkpoint.FORMAT and payload["version"] == checkpoint.VERSION
    assert payload["step"] == 20 and payload["config"]["model"]["n_embd"] == 32
    assert payload["tokenizer"]["chars"][0] == "\n"
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in payload["model"])
    assert {"batch", "torch"} <= set(payload["rng"]) and "optimizer" in payload


def test_run_dir_prefers_best_for_sampling_and_last_for_resume(run):
    assert checkpoint.resolve(run.run_dir).name == "best.pt"
    assert checkpoint.resolve(run.run_dir, prefer=checkpoint.LAST).name == "last.pt"


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated or not a minigpt checkpoint"),
    (lambda p: p.write_bytes(os.urandom(4096)), "truncated or not a minigpt checkpoint"),
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: torch.save({"weights": torch.zeros(2)}, p), "not a minigpt checkpoint"),
    (lambda p: torch.save({"format": checkpoint.FORMAT, "version": 99}, p), "format version 99"),
    (lambda p: torch.save({"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "model": {}}, p),
     "missing config, tokenizer, step"),
])
def test_bad_checkpoint_files_raise_clear_errors(run, tmp_path, damage, message):
    bad = tmp_path / "bad.pt"
    bad.write_bytes((run.run_dir / checkpoint.LAST).read_bytes())
    damage(bad)
    with pytest.raises(CheckpointError, match=message) as info:
        checkpoint.load(bad)
    assert str(bad) in str(info.value)


def damaged_copy(run, tmp_path, where: str, name: str = checkpoint.LAST):
    """A copy of the run's two checkpoints in tmp_path/run, with 5,000 seeded random bytes written over `name` at `where`."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True)
    for each in (checkpoint.LAST, checkpoint.BEST):
        (run_dir / each).write_bytes((run.run_dir / each).read_bytes())
    target = run_dir / name
    raw = bytearray(target.read_bytes())
    at = {"beginning": 0, "middle": len(raw) // 2, "end": len(raw) - 5_000}[where]
    raw[at:at + 5_000] = random.Random(at).randbytes(5_000)
    target.write_bytes(bytes(raw))
    return target


@pytest.mark.parametrize("where", ["beginning", "middle", "end"])
def test_damaged_bytes_are_refused_by_sample_eval_and_info_naming_the_last_good_one(run, tmp_path, where):
    from typer.testing import CliRunner

    from minigpt.cli import app

    bad = damaged_copy(run, tmp_path, where)
    good = bad.with_name(checkpoint.BEST)
    for args in (["sample", "-n", "20"], ["eval"], ["info"]):
        done = CliRunner().invoke(app, [*args, "--checkpoint", str(bad)])
        assert done.exit_code == CheckpointError.exit_code == 4, (args, done.output)
        message = done.stderr.strip()
        assert message.startswith(f"error: checkpoint {bad} ") and "\n" not in message, message
        assert f"the last good checkpoint is {good} (step " in message, message
        assert done.stdout == ""
    # The run directory itself means its best.pt: that one is intact, so sampling from the directory works.
    assert CliRunner().invoke(app, ["info", "--checkpoint", str(bad.parent)]).exit_code == 0


def test_damaged_weights_anywhere_are_refused_and_a_damaged_best_names_last(run, tmp_path):
    """Zeros (finite, plausible) over the middle of best.pt: refused; with both damaged, no last good one is named."""
    bad = damaged_copy(run, tmp_path, "middle", name=checkpoint.BEST)
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 5_000] = bytes(5_000)
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="damaged") as info:
        checkpoint.load(bad.parent)  # the run directory: best.pt first
    assert str(bad) in str(info.value) and f"the last good checkpoint is {bad.with_name(checkpoint.LAST)}" in str(info.value)
    last = damaged_copy(run, tmp_path / "both", "middle")
    (last.with_name(checkpoint.BEST)).write_bytes(bad.read_bytes())
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(last)
    assert "last good" not in str(info.value) and str(last.with_name(checkpoint.BEST)) in str(info.value)


def test_non_finite_weights_are_refused(run, tmp_path):
    payload = checkpoint.load(run.run_dir)
    name = next(iter(payload["model"]))
    payload["model"][name][0] = float("nan")
    checkpoint.save(tmp_path / "nan.pt", {k: v for k, v in payload.items() if k not in ("format", "version", "path")})
    with pytest.raises(CheckpointError, match=rf"checkpoint .*nan.pt is damaged: .*{re.escape(name)}"):
        checkpoint.load(tmp_path / "nan.pt")


def test_a_checkpoint_outside_a_zip_archive_still_loads(run, tmp_path):
    """torch's older (non-zip) format carries no CRCs: it is read as before."""
    payload = checkpoint.load(run.run_dir)
    torch.save({k: v for k, v in payload.items() if k != "path"}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert checkpoint.load(tmp_path / "old.pt")["step"] == payload["step"]


def test_missing_paths_and_empty_run_dirs(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "nothing.pt")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        checkpoint.load(tmp_path)


def test_failed_write_keeps_previous_checkpoint_and_names_path(run, tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    target.write_bytes((run.run_dir / checkpoint.LAST).read_bytes())
    before = target.read_bytes()
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match=rf"could not write checkpoint {target}: No space left on device "
                                               r"\(the previous checkpoint there is intact\)"):
        checkpoint.save(target, {"step": 1})
    monkeypatch.setattr(torch, "save", real_save)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind
    assert checkpoint.load(target)["step"] == 20


def test_unwritable_run_directory_is_reported(run, tmp_path):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="could not write checkpoint .*file-not-dir/last.pt"):
        checkpoint.save(blocker / "last.pt", {"step": 1})
