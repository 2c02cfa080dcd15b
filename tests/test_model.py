"""The model: attention paths agree, causality, initialisation, loss, learning; on each test device."""

import pytest
import torch

from minigpt.config import ModelConfig
from minigpt.model import GPT, rotary_angles, rotate


def make(seed=0, device="cpu", **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, dropout=0.0, **kw)
    return GPT(cfg, vocab_size=11).to(device).eval()


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_explicit_attention_equals_fused(device, position):
    model = make(device=device, position=position)
    idx = torch.randint(0, 11, (3, 16), device=device)
    fused, _ = model(idx)
    model.set_fused_attention(False)
    explicit, _ = model(idx)
    assert torch.allclose(fused, explicit, atol=1e-5)
    assert not torch.equal(fused, torch.zeros_like(fused))


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_future_tokens_do_not_change_past_logits(device, position):
    model = make(device=device, position=position)
    idx = torch.randint(0, 11, (2, 16), device=device)
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 11
    for fused in (True, False):
        model.set_fused_attention(fused)
        a, _ = model(idx)
        b, _ = model(changed)
        assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6)
        assert not torch.allclose(a[:, 9:], b[:, 9:], atol=1e-3)


def test_attention_weights_rows_sum_to_one_and_are_causal(device):
    model = make(device=device)
    maps = model.attention_maps(torch.randint(0, 11, (2, 10), device=device))
    assert len(maps) == 2 and maps[0].shape == (2, 4, 10, 10)
    for w in maps:
        assert torch.allclose(w.sum(-1), torch.ones(2, 4, 10, device=w.device), atol=1e-6)
        assert torch.all(torch.triu(w, diagonal=1) == 0)


def test_rope_scores_depend_only_on_the_distance_between_positions():
    """A rotated query at position i against a rotated key at j scores the same as at i + s and j + s."""
    torch.manual_seed(0)
    cos, sin = rotary_angles(32, 8)
    q, k = torch.randn(8), torch.randn(8)
    score = lambda i, j: rotate(q, cos[i], sin[i]) @ rotate(k, cos[j], sin[j])
    for i, j, shift in ((5, 2, 7), (9, 9, 20), (3, 0, 28)):
        torch.testing.assert_close(score(i, j), score(i + shift, j + shift))
    assert not torch.isclose(score(5, 2), score(5, 4))  # but the distance itself matters
    torch.testing.assert_close(rotate(q, cos[0], sin[0]), q)  # position 0 is not turned
    torch.testing.assert_close(rotate(q, cos[13], sin[13]).norm(), q.norm())  # a rotation keeps the length


def test_rope_model_has_no_position_embedding_and_sees_order():
    """Without wpe the model still tells orders apart: the same characters in another order give other logits."""
    model = make(position="rope")
    assert "wpe" not in model.transformer and "wpe" in make().transformer
    assert model.num_params() == model.num_params(non_embedding=False)
    assert make().num_params(non_embedding=False) - make().num_params() == 16 * 32
    idx = torch.tensor([[1, 2, 3, 4, 5, 6]])
    swapped = torch.tensor([[2, 1, 3, 4, 5, 6]])
    assert not torch.allclose(model(idx)[0][0, -1], model(swapped)[0][0, -1], atol=1e-4)


def test_weights_are_tied_and_residual_projections_scaled():
    model = make()
    assert model.lm_head.weight is model.transformer.wte.weight
    proj = model.transformer.h[0].attn.c_proj.weight.std().item()
    fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert proj < fc * 0.7  # 0.02 / sqrt(2 * n_layer) = 0.01 vs 0.02


def test_loss_is_mean_cross_entropy_and_near_log_vocab_at_init():
    model = make()
    idx, targets = torch.randint(0, 11, (4, 16)), torch.randint(0, 11, (4, 16))
    logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1))
    assert torch.allclose(loss, expected)
    assert abs(loss.item() - torch.log(torch.tensor(11.0)).item()) < 0.3


def test_tiny_model_overfits_one_batch(device):
    torch.manual_seed(0)
    model = make(device=device).train()
    idx = torch.randint(0, 11, (4, 17), device=device)
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(200):
        _, loss = model(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 < first


def test_optimizer_groups_decay_matrices_only():
    model = make()
    decay, no_decay = model.optimizer_groups(0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_every_member_of_the_kv_cache_is_used_by_the_package():
    """No dead code in the cache a reader studies: each property and method of LayerCache/KVCache is used elsewhere."""
    import inspect
    import re
    from pathlib import Path

    from minigpt import model as model_mod

    package = Path(model_mod.__file__).parent
    for cls in (model_mod.LayerCache, model_mod.KVCache):
        definition = inspect.getsource(cls)
        rest = "\n".join(p.read_text() for p in package.glob("*.py")).replace(definition, "")
        members = [name for name, value in vars(cls).items()
                   if not name.startswith("_") and (isinstance(value, property) or inspect.isfunction(value))]
        unused = [name for name in members if not re.search(rf"\.{name}\b", rest)]
        assert not unused, f"{cls.__name__} members used nowhere in minigpt/: {unused}"
