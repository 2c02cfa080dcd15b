"""Training loop: repeatability, exact resume, refusal rules, non-finite loss, LR schedule."""

import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from minigpt import checkpoint
from minigpt.config import TrainConfig
from minigpt.errors import CheckpointError, TrainingError
from minigpt.model import GPT
from minigpt.training import get_lr, train

from conftest import deterministic, device_cases, tiny_config, train_dtypes

FAST = ["train.warmup_iters=2", "train.log_interval=1", "train.sample_chars=0", "train.eval_iters=2", "model.dropout=0.1"]


def scalars(run_dir, tag):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    t = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=100)
    lrs = [get_lr(s, t) for s in range(120)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # rising during warmup
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:101]))  # cosine decay
    assert lrs[55] == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-6)  # halfway point of the cosine
    assert lrs[100] == lrs[119] == pytest.approx(1e-4)


def test_same_config_twice_gives_same_losses(tmp_path, corpus):
    runs = {name: train(tiny_config(tmp_path / name, corpus, "train.max_iters=12", "train.eval_interval=6", *FAST, *sets),
                        progress=False)
            for name, sets in (("a", []), ("b", []), ("other_seed", ["train.seed=7"]))}
    a, b, other = (scalars(runs[name].run_dir, "train/loss") for name in ("a", "b", "other_seed"))
    assert len(a) == 12 and len({v for _, v in a}) > 1  # a real curve, one point per step
    assert a == b
    assert [h["val_loss"] for h in runs["a"].history] == [h["val_loss"] for h in runs["b"].history]
    # The comparison can tell runs apart: another seed (weights, batches, dropout) gives other losses.
    assert [v for _, v in other] != [v for _, v in a]
    assert runs["other_seed"].history[-1]["val_loss"] != runs["a"].history[-1]["val_loss"]


@pytest.mark.parametrize("device_name, dtype", device_cases(train_dtypes))
def test_resume_is_bit_exact_with_uninterrupted_run(tmp_path, corpus, device_name, dtype):
    # The schedule is pinned to 20 steps, so stopping at 10 does not change the learning rates.
    sets = ["train.eval_interval=5", "train.gradient_accumulation_steps=2", "train.lr_decay_iters=20",
            f"train.dtype={dtype}", f"train.device={device_name}", *FAST]
    with deterministic(device_name):
        straight = train(tiny_config(tmp_path / "s", corpus, "train.max_iters=20", *sets), progress=False)
        first = train(tiny_config(tmp_path / "r", corpus, "train.max_iters=10", *sets), progress=False)
        resumed = train(tiny_config(tmp_path / "r", corpus, "train.max_iters=20", *sets), resume=True, progress=False)
    assert first.step == 10 and resumed.step == straight.step == 20
    # Identical losses at every step, read back from TensorBoard (no duplicated or missing steps) ...
    assert scalars(resumed.run_dir, "train/loss") == scalars(straight.run_dir, "train/loss")
    assert [s for s, _ in scalars(resumed.run_dir, "train/loss")] == list(range(1, 21))
    # ... and identical final weights, optimizer moments and best validation loss.
    a = checkpoint.load(straight.run_dir, prefer=checkpoint.LAST)
    b = checkpoint.load(resumed.run_dir, prefer=checkpoint.LAST)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert a["best_val_loss"] == b["best_val_loss"] and a["step"] == b["step"] == 20
    assert all(w.dtype == torch.float32 for w in b["model"].values())  # autocast leaves the weights float32
    assert b["config"]["train"]["dtype"] == dtype
    assert (b["scaler"] is not None) == (dtype == "float16")  # float16's loss scale is resumed too


@pytest.mark.parametrize("device_name, dtype",
                         device_cases(lambda device: [d for d in train_dtypes(device) if d != "float32"]))
def test_low_precision_training_learns_like_float32(tmp_path, corpus, device_name, dtype, capsys):
    """bf16 autocast (and float16 with loss scaling, on CUDA): the loss falls far below an untrained model's, as
    in float32, and stays close to float32's without being identical to it (autocast really ran); the run
    reports its dtype."""
    runs = {}
    for d in ("float32", dtype):
        runs[d] = train(tiny_config(tmp_path / d, corpus, "train.max_iters=30", "train.eval_interval=30",
                                    f"train.dtype={d}", f"train.device={device_name}", *FAST), progress=False)
        assert f"dtype {d}," in capsys.readouterr().err
    full, low = (runs[d].history[-1]["val_loss"] for d in ("float32", dtype))
    # An untrained model predicts every character of the vocabulary about equally: loss ln(vocab_size).
    untrained = math.log(len(checkpoint.load(runs[dtype].run_dir)["tokenizer"]["chars"]))
    assert full < untrained - 0.5 and low < untrained - 0.5
    assert abs(low - full) < 0.05 and low != full
    curve = scalars(runs[dtype].run_dir, "train/loss")
    assert curve[-1][1] < curve[0][1] - 0.5


def test_fresh_run_hides_points_left_by_an_attempt_that_never_checkpointed(tmp_path, corpus):
    """A run killed before its first checkpoint leaves event files; starting again must not show its steps twice."""
    from torch.utils.tensorboard import SummaryWriter

    cfg = tiny_config(tmp_path, corpus, "train.max_iters=6", "train.eval_interval=6", *FAST)
    cfg.run_dir().mkdir(parents=True)
    stale = SummaryWriter(str(cfg.run_dir()))
    for step in (1, 2, 3):
        stale.add_scalar("train/loss", 9.0, step)
    stale.close()
    result = train(cfg, progress=False)
    points = scalars(result.run_dir, "train/loss")
    assert [s for s, _ in points] == list(range(1, 7)) and 9.0 not in [v for _, v in points]


def test_resume_refuses_shape_change_and_allows_harmless_ones(tmp_path, corpus, capsys):
    train(tiny_config(tmp_path, corpus, "train.max_iters=4", "train.eval_interval=4", *FAST), progress=False)
    with pytest.raises(CheckpointError, match=r"model shape \(model.n_embd 32 -> 64\)"):
        train(tiny_config(tmp_path, corpus, "train.max_iters=8", "model.n_embd=64", *FAST), resume=True, progress=False)
    result = train(tiny_config(tmp_path, corpus, "train.max_iters=8", "train.eval_interval=4",
                               "train.learning_rate=1e-3", *FAST), resume=True, progress=False)
    assert result.step == 8
    err = capsys.readouterr().err
    assert "resuming with changed settings" in err and "train.learning_rate 0.003 -> 0.001" in err
    assert "train.max_iters 4 -> 8" in err


def test_resume_refuses_a_different_vocabulary(tmp_path, corpus):
    train(tiny_config(tmp_path, corpus, "train.max_iters=4", "train.eval_interval=4", *FAST), progress=False)
    other = tmp_path / "other.txt"
    other.write_text("xyz" * 4000 + "QQ\n" * 1000)
    with pytest.raises(CheckpointError, match="vocabulary differs"):
        train(tiny_config(tmp_path, other, "train.max_iters=8", *FAST), resume=True, progress=False)


def test_resuming_a_finished_run_says_it_is_complete(tmp_path, corpus, capsys):
    cfg = tiny_config(tmp_path, corpus, "train.max_iters=4", "train.eval_interval=4", *FAST)
    train(cfg, progress=False)
    capsys.readouterr()
    assert train(cfg, resume=True, progress=False).step == 4
    assert "already complete at step 4" in capsys.readouterr().err


def test_resume_before_the_first_evaluation_says_none_yet(tmp_path, corpus, capsys):
    """A run stopped before its first evaluation saved best_val_loss inf: resuming says "none yet", not "inf"."""
    cfg = tiny_config(tmp_path, corpus, "train.max_iters=3", "train.eval_interval=3", *FAST)
    train(cfg, progress=False)
    last = cfg.run_dir() / checkpoint.LAST
    payload = checkpoint.load(last)
    checkpoint.save(last, {**payload, "best_val_loss": float("inf")})  # what a Ctrl-C before step eval_interval saves
    capsys.readouterr()
    train(tiny_config(tmp_path, corpus, "train.max_iters=4", "train.eval_interval=3", *FAST), resume=True, progress=False)
    err = capsys.readouterr().err
    assert f"resuming {last} at step 3 (best val loss none yet)" in err and "inf" not in err


def test_resume_without_a_checkpoint_says_so(tmp_path, corpus):
    with pytest.raises(CheckpointError, match="nothing to resume: run directory .* holds no last.pt"):
        train(tiny_config(tmp_path, corpus, *FAST), resume=True, progress=False)


def test_fresh_run_does_not_overwrite_existing_checkpoints(tmp_path, corpus):
    train(tiny_config(tmp_path, corpus, "train.max_iters=4", "train.eval_interval=4", *FAST), progress=False)
    with pytest.raises(CheckpointError, match="already holds a checkpoint; pass --resume"):
        train(tiny_config(tmp_path, corpus, "train.max_iters=4", *FAST), progress=False)
    assert train(tiny_config(tmp_path, corpus, "train.max_iters=4", *FAST), overwrite=True, progress=False).step == 4


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, corpus, monkeypatch):
    cfg = tiny_config(tmp_path, corpus, "train.max_iters=10", "train.eval_interval=5", *FAST)
    train(cfg, progress=False)
    last = cfg.run_dir() / checkpoint.LAST
    best = cfg.run_dir() / checkpoint.BEST
    before = (last.read_bytes(), best.read_bytes())
    calls = {"n": 0}
    real_forward = GPT.forward

    def poisoned(self, idx, targets=None, kv_cache=None):
        logits, loss = real_forward(self, idx, targets, kv_cache)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] >= 3:  # step 13 of the resumed run
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    cfg20 = tiny_config(tmp_path, corpus, "train.max_iters=20", "train.eval_interval=5", *FAST)
    with pytest.raises(TrainingError, match=r"loss became nan at step 13.*last\.pt is untouched.*lower train\.learning_rate"):
        train(cfg20, resume=True, progress=False)
    assert (last.read_bytes(), best.read_bytes()) == before


def started_run(tmp_path, corpus, *sets):
    from minigpt.distributed import World
    from minigpt.run import start_run

    cfg = tiny_config(tmp_path, corpus, "train.max_iters=20", *FAST, *sets)
    return start_run(cfg, World(), overwrite=True)


def test_the_next_batch_is_read_while_the_step_computes_and_in_the_same_order(tmp_path, corpus):
    """train_step reads the following batch after the forward pass (before backward); the batches are the ones a
    fresh generator with the same seed gives, in order, and a checkpoint keeps the state from before the read."""
    from minigpt.run import rank_batch
    from minigpt.training import train_step

    run = started_run(tmp_path, corpus, "train.gradient_accumulation_steps=2")
    try:
        seen, ahead = [], []
        real_next = run.next_batch

        def recording_next():
            batch = real_next()
            seen.append(batch[0].clone())
            return batch

        run.next_batch = recording_next
        handle = run.model.lm_head.weight.register_hook(lambda grad: ahead.append(run.prefetched is not None))
        state_after_step = None
        for _ in range(3):
            train_step(run)
            state_after_step = run.state()["rng"]["batch"]
        handle.remove()
        assert ahead == [True] * 6  # every backward ran with the next batch already read
        generator = torch.Generator().manual_seed(run.cfg.train.seed)
        expected = [rank_batch(run.tokens["train"], run.cfg, generator, run.world, run.device)[0] for _ in range(6)]
        assert all(torch.equal(a, b) for a, b in zip(seen, expected)) and len(seen) == 6
        assert torch.equal(state_after_step, generator.get_state())  # not the state after the batch read ahead
    finally:
        run.close()


def test_evaluation_runs_the_module_the_steps_run(tmp_path, corpus):
    """The losses are estimated with run.step_model (compiled and/or in DDP where it is), not the plain module."""
    from minigpt.evaluation import Outputs, evaluate_and_save
    from minigpt.tracking import Tracker

    run = started_run(tmp_path, corpus)
    calls = {"n": 0}

    class Recording(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            calls["n"] += 1
            return self.inner(*args, **kwargs)

    run.step_model = Recording(run.model)
    tracker = Tracker(tmp_path / "scratch", 0, 1, progress=False)
    try:
        evaluate_and_save(run, Outputs(tracker, tmp_path / "scratch", say=lambda m: None))
    finally:
        tracker.close()
        run.close()
    assert calls["n"] == 2 * run.cfg.train.eval_iters  # each split's batches


def test_processes_agree_once_per_log_interval_not_at_every_step(tmp_path, corpus, monkeypatch):
    """The stop check and a budget's plan travel in one collective at each log boundary (World.agree); between
    boundaries a step asks nothing of the other processes (no World.any, which is an all-reduce and a host sync)."""
    from minigpt.distributed import World

    calls = {"any": 0, "agree": 0}
    real_agree = World.agree

    def counting_any(self, flag):
        calls["any"] += 1
        return flag

    def counting_agree(self, values, flag):
        calls["agree"] += 1
        return real_agree(self, values, flag)

    monkeypatch.setattr(World, "any", counting_any)
    monkeypatch.setattr(World, "agree", counting_agree)
    train(tiny_config(tmp_path, corpus, "train.max_iters=30", "train.log_interval=10", "train.eval_interval=30",
                      "train.sample_chars=0", "train.eval_iters=1"), progress=False)
    assert calls == {"any": 0, "agree": 3}
