"""One attention head of a trained model, followed step by step on a prompt's characters.

A notebook on attention builds it from parts: embed the characters and their positions, layer
norm, project to q, k and v, score q against k, scale by 1/sqrt(hs), mask the future with
-inf, softmax, take the weighted sum of the values, merge the heads and project, add to the
residual. `explain` replays exactly those steps with a trained model's own weights, sliced out
of its modules (there is no second copy of the model), on one prompt, and keeps every
intermediate with its shape. The tests check each replayed step against what the modules
themselves compute: the weights equal `GPT.attention_maps`, the merged and projected heads equal
the attention module's output, and the final distribution equals the softmax of the model's
logits.

Shape letters as in model.py: T characters, C = n_embd channels, hs = C // n_head per head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from minigpt.inspection import pick
from minigpt.model import GPT, rotate
from minigpt.viz import visible

TOP = 5  # most likely next characters shown


@dataclass
class Step:
    """One intermediate: its numbers, what they are, and what labels its rows and columns."""

    key: str  # short name, e.g. "q" or "weights"
    title: str  # what this step computes, in a notebook's words
    value: torch.Tensor  # (T, C), (T, hs) or (T, T), on the CPU
    columns: str  # "characters" (keys of an attention matrix) or "channels"


@dataclass
class Explanation:
    """Every step of one head of one layer on one prompt, and the model's next-character distribution."""

    chars: list[str]  # the characters the model read (the prompt's last block_size)
    layer: int
    head: int
    n_head: int
    steps: list[Step]
    probs: torch.Tensor  # (V,) the model's distribution over the next character
    vocab: list[str]  # the character of each id
    next_chars: list[tuple[str, float]]  # the TOP most likely next characters with their probabilities

    def __getitem__(self, key: str) -> torch.Tensor:
        """The value of a step by its key, e.g. explanation["weights"]."""
        for step in self.steps:
            if step.key == key:
                return step.value
        raise KeyError(f"no step {key!r}; steps: {', '.join(s.key for s in self.steps)}")

    def to_dict(self) -> dict:
        """Every number, as plain data for JSON (a masked score, -inf, is written as null)."""
        def plain(t: torch.Tensor) -> list:
            return [[None if math.isinf(v) else v for v in row] for row in t.tolist()]

        return {
            "prompt": "".join(self.chars), "characters": self.chars, "layer": self.layer, "head": self.head,
            "steps": [{"key": s.key, "title": s.title, "shape": list(s.value.shape), "columns": s.columns,
                       "values": plain(s.value)} for s in self.steps],
            "next": [{"char": c, "p": p} for c, p in self.next_chars],
            "distribution": dict(zip(self.vocab, self.probs.tolist())),
        }

    def to_text(self, max_positions: int = 16, max_channels: int = 8, decimals: int = 2) -> str:
        """The steps as labelled tables: rows are the prompt's characters, numbers rounded.

        Long prompts show their last `max_positions` characters, wide rows their first
        `max_channels` channels (to_dict and --json hold everything)."""
        T = len(self.chars)
        first = max(0, T - max_positions)
        title = f"explain: layer {self.layer}, head {self.head} of {self.n_head}, on {T} characters {''.join(self.chars)!r}"
        lines = [title]
        if first:
            lines.append(f"(tables show positions {first}..{T - 1}; --json has all {T})")
        for number, step in enumerate(self.steps, 1):
            shape = " x ".join(str(n) for n in step.value.shape)
            lines += ["", f"{number}. {step.title}  ({shape})"]
            lines += _table(step, self.chars, first, max_channels, decimals)
        last = (f"{len(self.steps) + 1}. next character after {visible(self.chars[-1])!r}: the MLP, "
                "the later blocks, ln_f, lm_head and a softmax give")
        lines += ["", last]
        lines += [f"   {visible(c)!r:>6}  {p:.3f}" for c, p in self.next_chars]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def _table(step: Step, chars: list[str], first: int, max_channels: int, decimals: int) -> list[str]:
    """Rows labelled with position and character; columns with keys' characters or channel numbers."""
    value = step.value
    width = decimals + 5
    if step.columns == "characters":
        cols = list(range(first, value.size(1)))
        header = [f"{visible(chars[j]):>{width}}" for j in cols]
        more = ""
    else:
        cols = list(range(min(max_channels, value.size(1))))
        header = [f"{'c' + str(j):>{width}}" for j in cols]
        more = f"  ... {value.size(1) - len(cols)} more" if value.size(1) > len(cols) else ""
    out = ["   " + " " * 8 + "".join(header) + more]
    for i in range(first, value.size(0)):
        cells = "".join(_number(float(value[i, j]), width, decimals) for j in cols)
        out.append(f"   {i:>3} {visible(chars[i]):>4}" + cells)
    if step.key == "weights":
        sums = value[first:].sum(dim=-1)
        out.append(f"   each row sums to 1 (sums from {float(sums.min()):.6f} to {float(sums.max()):.6f})")
    return out


def _number(v: float, width: int, decimals: int) -> str:
    return f"{'-inf':>{width}}" if v == float("-inf") else f"{v:>{width}.{decimals}f}"


@torch.no_grad()
def explain(model: GPT, ids: list[int], vocab: list[str], layer: int = 0, head: int = 0) -> Explanation:
    """Follow head `head` of layer `layer` through its steps on `ids` (at most block_size of them), in eval mode.

    `vocab[i]` is the character of id i (the tokenizer's chars)."""
    c = model.config
    pick(layer, c.n_layer, "layer")
    pick(head, c.n_head, "head")
    if not 0 < len(ids) <= c.block_size:
        raise ValueError(f"explain takes 1 to block_size ({c.block_size}) ids, got {len(ids)}")
    was_training = model.training
    model.eval()
    try:
        return _explain(model, ids, vocab, layer, head)
    finally:
        model.train(was_training)


def _explain(model: GPT, ids: list[int], vocab: list[str], layer: int, head: int) -> Explanation:
    C, nh = model.config.n_embd, model.config.n_head
    hs = C // nh
    tr = model.transformer
    device = tr.wte.weight.device
    T = len(ids)
    steps: list[Step] = []

    def keep(key: str, title: str, value: torch.Tensor, columns: str = "channels") -> torch.Tensor:
        steps.append(Step(key, title, value.detach().float().cpu(), columns))
        return value

    # Embeddings: a row of wte per character, a row of wpe per position, added (RoPE: wte alone).
    idx = torch.tensor(ids, dtype=torch.long, device=device)  # (T,)
    tok = keep("tok_emb", "token embeddings: the row of wte for each character", tr.wte.weight[idx])  # (T, C)
    if "wpe" in tr:
        pos = keep("pos_emb", "position embeddings: rows 0..T-1 of wpe", tr.wpe.weight[:T])  # (T, C)
        x = keep("x", "x = token + position embedding", tok + pos)  # (T, C)
    else:  # RoPE: positions enter when q and k are turned, below
        x = keep("x", "x = token embedding (RoPE: no position embedding; positions turn q and k below)", tok)
    if layer > 0:  # the residual stream entering this layer, from the model's own earlier blocks
        for block in tr.h[:layer]:
            x = block(x[None])[0][0]
        earlier = "block 0" if layer == 1 else f"blocks 0..{layer - 1}"
        keep("x_in", f"x after {earlier}: the residual stream entering layer {layer}", x)
    block = tr.h[layer]
    attn = block.attn

    # Layer norm: each row to mean 0 and variance 1, then ln_1's gain and bias.
    mean, var = x.mean(dim=-1, keepdim=True), x.var(dim=-1, unbiased=False, keepdim=True)  # (T, 1) each
    xn = (x - mean) / torch.sqrt(var + block.ln_1.eps) * block.ln_1.weight
    if block.ln_1.bias is not None:
        xn = xn + block.ln_1.bias
    keep("ln_1", f"ln_1(x): each row normalised to mean 0, variance 1, then scaled by ln_1.weight{_plus(block.ln_1.bias, 'ln_1.bias')}", xn)

    def project(part: int, h: int) -> torch.Tensor:
        """Head h's slice of c_attn: part 0 = query, 1 = key, 2 = value; (T, hs)."""
        rows = slice(part * C + h * hs, part * C + (h + 1) * hs)
        out = xn @ attn.c_attn.weight[rows].T
        return out + attn.c_attn.bias[rows] if attn.c_attn.bias is not None else out

    future = torch.ones(T, T, dtype=torch.bool, device=device).triu(diagonal=1)  # key j > query i: masked

    def attend(h: int, record: bool) -> torch.Tensor:
        """The steps of one head, recorded for the chosen one; its output (T, hs)."""
        show = keep if record else (lambda key, title, value, columns="channels": value)
        q = show("q", f"q = ln_1(x) @ W_q: head {h}'s query for each position", project(0, h))  # (T, hs)
        k = show("k", f"k = ln_1(x) @ W_k: head {h}'s key for each position", project(1, h))  # (T, hs)
        v = show("v", f"v = ln_1(x) @ W_v: head {h}'s value for each position", project(2, h))  # (T, hs)
        if attn.rope:  # each position's query and key turned by its own angles, channel pair by pair
            cos, sin = attn.rope_cos[:T], attn.rope_sin[:T]  # (T, hs/2)
            q = show("q_rope", "RoPE: q with channel pairs (i, i + hs/2) turned by position * 10000^(-2i/hs)",
                     rotate(q, cos, sin))  # (T, hs)
            k = show("k_rope", "RoPE: k turned the same way, so q . k depends on how far apart they are",
                     rotate(k, cos, sin))  # (T, hs)
        scores = show("scores", "scores = q @ k.T: how well each query (row) matches each key (column)",
                      q @ k.T, "characters")  # (T, T)
        scaled = show("scaled", f"scaled = scores / sqrt(hs) = scores / sqrt({hs})", scores / math.sqrt(hs), "characters")
        masked = show("masked", "causal mask: -inf above the diagonal (no position sees its future)",
                      scaled.masked_fill(future, float("-inf")), "characters")
        weights = show("weights", "softmax over each row: the attention weights", F.softmax(masked, dim=-1), "characters")
        return show("head_out", "head output = weights @ v: each position's weighted sum of values", weights @ v)

    heads = [attend(h, record=h == head) for h in range(nh)]  # nh x (T, hs)
    merged = keep("merged", f"merge: the {nh} heads' outputs side by side (head {head} is channels "
                            f"{head * hs}..{(head + 1) * hs - 1})", torch.cat(heads, dim=-1))  # (T, C)
    out = merged @ attn.c_proj.weight.T
    out = out + attn.c_proj.bias if attn.c_proj.bias is not None else out
    keep("attn_out", "output projection: merged @ c_proj (the attention block's output)", out)  # (T, C)
    x = keep("residual", "residual: x + attention output", x + out)  # (T, C)

    # The rest of the network, by the model's own modules: MLP, later blocks, ln_f, lm_head.
    x = x + block.mlp(block.ln_2(x))
    for later in tr.h[layer + 1:]:
        x = later(x[None])[0][0]
    logits = model.lm_head(tr.ln_f(x[-1]))  # (V,): the last position's scores for the next character
    probs = F.softmax(logits.float(), dim=-1).cpu()
    top = torch.topk(probs, min(TOP, probs.numel()))
    next_chars = [(vocab[int(i)], float(p)) for p, i in zip(top.values, top.indices)]
    return Explanation([vocab[i] for i in ids], layer, head, nh, steps, probs, list(vocab), next_chars)


def _plus(bias: torch.Tensor | None, name: str) -> str:
    return f", plus {name}" if bias is not None else ""
