"""explain: every replayed step of one attention head equals what the model's own modules compute."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

from minigpt.config import ModelConfig
from minigpt.errors import PromptError
from minigpt.explain import explain
from minigpt.model import GPT

VOCAB = [chr(ord("a") + i) for i in range(20)]


def make_model(bias: bool = True, seed: int = 0, position: str = "learned") -> GPT:
    """A random 3-layer model (weights scaled up so attention is far from uniform)."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(n_layer=3, n_head=4, n_embd=32, block_size=16, dropout=0.0, bias=bias,
                            position=position), len(VOCAB))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval()


IDS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]


@pytest.mark.parametrize("bias,position", [(True, "learned"), (False, "learned"), (True, "rope")])
@pytest.mark.parametrize("layer,head", [(0, 0), (1, 3), (2, 2)])
def test_every_step_equals_the_modules(bias, position, layer, head):
    model = make_model(bias, position=position)
    e = explain(model, IDS, VOCAB, layer, head)
    idx = torch.tensor([IDS])
    T, C, hs = len(IDS), 32, 8
    tr = model.transformer
    with torch.no_grad():
        x = tr.wte(idx) + (tr.wpe(torch.arange(T)) if position == "learned" else 0)  # (1, T, C)
        torch.testing.assert_close(e["x"], x[0])
        for block in tr.h[:layer]:
            x, _ = block(x)
        block = tr.h[layer]
        if layer > 0:
            torch.testing.assert_close(e["x_in"], x[0])
        torch.testing.assert_close(e["ln_1"], block.ln_1(x)[0])
        q, k, v = block.attn.c_attn(block.ln_1(x)).split(C, dim=2)  # the module's projection, then this head's channels
        for key, full in (("q", q), ("k", k), ("v", v)):
            torch.testing.assert_close(e[key], full[0, :, head * hs:(head + 1) * hs])
        if position == "rope":  # the scores are those of the turned query and key
            torch.testing.assert_close(e["scores"], e["q_rope"] @ e["k_rope"].T)
            assert not torch.allclose(e["q_rope"], e["q"])
        else:
            assert "q_rope" not in [step.key for step in e.steps]
        # The weights equal the model's own attention maps; each row sums to 1; the future is masked.
        torch.testing.assert_close(e["weights"], model.attention_maps(idx)[layer][0, head])
        torch.testing.assert_close(e["weights"].sum(-1), torch.ones(T))
        above = torch.ones(T, T, dtype=torch.bool).triu(1)
        assert torch.all(e["masked"][above] == float("-inf")) and torch.all(torch.isfinite(e["masked"][~above]))
        torch.testing.assert_close(e["scaled"], e["scores"] / hs ** 0.5)
        # The heads merged and projected equal the attention module's output; then the residual.
        attn_out, _ = block.attn(block.ln_1(x))
        torch.testing.assert_close(e["attn_out"], attn_out[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(e["merged"][:, head * hs:(head + 1) * hs], e["head_out"])
        torch.testing.assert_close(e["residual"], (x + attn_out)[0], rtol=1e-5, atol=1e-5)
        # The final distribution equals the model's softmax of its logits at the last position.
        probs = F.softmax(model(idx)[0][0, -1], dim=-1)
    torch.testing.assert_close(e.probs, probs, rtol=1e-5, atol=1e-6)
    top = torch.topk(probs, 5)
    assert [c for c, _ in e.next_chars] == [VOCAB[i] for i in top.indices.tolist()]
    assert [p for _, p in e.next_chars] == pytest.approx(top.values.tolist(), abs=1e-6)


def test_json_is_complete_and_text_is_labelled():
    model = make_model()
    e = explain(model, IDS, VOCAB, 1, 2)
    data = json.loads(json.dumps(e.to_dict(), allow_nan=False))  # strict JSON: a masked score is null
    assert data["layer"] == 1 and data["head"] == 2 and data["prompt"] == "".join(VOCAB[i] for i in IDS)
    steps = {s["key"]: s for s in data["steps"]}
    assert [s.key for s in e.steps] == list(steps)
    assert steps["weights"]["shape"] == [10, 10] and steps["q"]["shape"] == [10, 8] and steps["x"]["shape"] == [10, 32]
    assert steps["masked"]["values"][0][1] is None and steps["masked"]["values"][1][0] is not None
    torch.testing.assert_close(torch.tensor(steps["weights"]["values"]), e["weights"])
    assert sum(data["distribution"].values()) == pytest.approx(1.0, abs=1e-5) and len(data["next"]) == 5
    text = e.to_text()
    weights_table = text.split("softmax over each row")[1].split("\n\n")[0]
    header, first_row = weights_table.splitlines()[1:3]
    assert header.split() == [VOCAB[i] for i in IDS]  # columns: the keys' characters
    assert first_row.split()[:3] == ["0", VOCAB[IDS[0]], "1.00"]  # rows: position, character, weights
    assert "-inf" in text and "each row sums to 1" in text
    assert f"{e.next_chars[0][1]:.3f}" in text.splitlines()[-5]


def test_out_of_range_layer_or_head_names_the_range():
    model = make_model()
    with pytest.raises(PromptError, match="layer=3 is out of range.*0 to 2"):
        explain(model, IDS, VOCAB, 3, 0)
    with pytest.raises(PromptError, match="head=4 is out of range.*0 to 3"):
        explain(model, IDS, VOCAB, 0, 4)
