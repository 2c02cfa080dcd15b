"""Optimizers and schedules: Muon's split of the parameters, warmup-stable-decay, exact resume with Muon."""

import pytest
import torch

from minigpt import checkpoint
from minigpt.config import ModelConfig, TrainConfig
from minigpt.errors import CheckpointError
from minigpt.model import GPT
from minigpt.optim import Muon, Optimizers, get_lr, make_optimizer, orthogonalize
from minigpt.training import train

from conftest import tiny_config

FAST = ["train.warmup_iters=2", "train.log_interval=1", "train.sample_chars=0", "train.eval_iters=2", "model.dropout=0.1"]


def test_muon_takes_the_blocks_matrices_and_adamw_everything_else():
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8), vocab_size=11)
    opt = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    assert isinstance(opt, Optimizers)
    muon, adamw = opt.optimizers
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert not in_muon & in_adamw and in_muon | in_adamw == {id(p) for p in model.parameters()}
    assert sorted(names[i].split(".")[-2] for i in in_muon) == sorted(["c_attn", "c_fc", "c_proj", "c_proj"] * 2)
    assert id(model.lm_head.weight) in in_adamw and id(model.transformer.wpe.weight) in in_adamw  # embeddings: AdamW


def test_warmup_stable_decay_holds_the_peak_then_falls_linearly_to_min_lr():
    t = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=100, lr_schedule="wsd", decay_fraction=0.2)
    lrs = [get_lr(s, t) for s in range(110)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # warmup as with the cosine
    assert set(lrs[10:80]) == {1e-3}  # stable
    steps = [b - a for a, b in zip(lrs[80:100], lrs[81:101])]
    assert all(d == pytest.approx(steps[0]) for d in steps) and steps[0] < 0  # a straight line down ...
    assert lrs[90] == pytest.approx(5.5e-4) and lrs[100] == lrs[109] == pytest.approx(1e-4)  # ... to min_lr


def test_resume_with_muon_is_bit_exact(tmp_path, corpus):
    sets = ["train.optimizer=muon", "train.eval_interval=4", "train.lr_decay_iters=12", *FAST]
    straight = train(tiny_config(tmp_path / "s", corpus, "train.max_iters=12", *sets), progress=False)
    train(tiny_config(tmp_path / "r", corpus, "train.max_iters=8", *sets), progress=False)
    resumed = train(tiny_config(tmp_path / "r", corpus, "train.max_iters=12", *sets), resume=True, progress=False)
    a, b = (checkpoint.load(r.run_dir, prefer=checkpoint.LAST) for r in (straight, resumed))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    muon_a, muon_b = (p["optimizer"]["optimizers"][0]["state"] for p in (a, b))
    assert muon_a.keys() == muon_b.keys() and muon_a
    assert all(torch.equal(muon_a[i]["momentum_buffer"], muon_b[i]["momentum_buffer"]) for i in muon_a)
    assert resumed.history[-1]["val_loss"] == straight.history[-1]["val_loss"]


def test_resume_refuses_a_different_optimizer(tmp_path, corpus):
    train(tiny_config(tmp_path, corpus, "train.max_iters=4", "train.eval_interval=4", *FAST), progress=False)
    with pytest.raises(CheckpointError, match="trained with train.optimizer adamw, the config says muon"):
        train(tiny_config(tmp_path, corpus, "train.max_iters=8", "train.optimizer=muon", *FAST), resume=True, progress=False)


def test_orthogonalize_keeps_the_singular_vectors_and_brings_singular_values_near_one():
    g = torch.randn(384, 128, generator=torch.Generator().manual_seed(0))  # a gradient-like matrix
    out = orthogonalize(g)
    u, _, vt = torch.linalg.svd(g, full_matrices=False)
    s = torch.linalg.svdvals(out)
    assert out.shape == g.shape and s.min() > 0.5 and s.max() < 1.3  # the quintic's band around 1
    assert torch.linalg.norm(out - u @ vt) / torch.linalg.norm(u @ vt) < 0.3  # same directions
    assert torch.linalg.norm(orthogonalize(g.T) - out.T) < 1e-4  # tall and wide are the same iteration


def test_the_test_extra_asks_for_the_torch_that_has_torch_optim_muon():
    """The next test compares with torch.optim.Muon, which torch 2.9 introduced: the test extra (pip install -e
    '.[test]') requires torch>=2.9; the package itself (its own Muon) needs no torch.optim.Muon."""
    import re
    from pathlib import Path

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    test_extra = re.search(r"^test = \[(.*?)\]$", pyproject, re.MULTILINE).group(1)
    floor = re.search(r'"torch>=(\d+)\.(\d+)"', test_extra)
    assert floor and (int(floor.group(1)), int(floor.group(2))) >= (2, 9), test_extra
    assert hasattr(torch.optim, "Muon")


def test_muon_steps_like_torch_muon():
    """Our Muon (bf16 iteration) against torch.optim.Muon with adjust_lr_fn='match_rms_adamw', over three steps."""
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(48, 16, generator=gen), torch.randn(16, 64, generator=gen)]
    grads = [[torch.randn(p.shape, generator=gen) for p in start] for _ in range(3)]
    ours, theirs = ([p.clone().requires_grad_() for p in start] for _ in range(2))
    opts = [Muon(ours, lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16),
            torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")]
    for step_grads in grads:
        for params, opt in zip((ours, theirs), opts):
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
    for a, b, s in zip(ours, theirs, start):
        moved = torch.linalg.norm(b.detach() - s)
        assert moved > 0.1 and torch.linalg.norm(a.detach() - b.detach()) < 0.05 * moved  # bf16 rounding apart
