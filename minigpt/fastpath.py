"""The lean eval-mode forward pass that sampling runs: the same math as GPT.forward with a KV cache.

For small models, the time to generate one character is mostly per-operation overhead (Python,
module calls, dispatch), not arithmetic. In eval mode, minigpt.decoding runs the model through
flat tensor operations instead of the modules (tests check that both compute the same logits):
  * each Linear is one torch.addmm(bias, x, W) on a weight stored transposed, (in, out), so no
    transpose is made per call; the residual is added the same way: addmm(x + bias, y, W);
  * keys and values are stored with one copy (they sit side by side in LayerCache.kv);
  * GELU is written with erf, gelu(h) = h/2 * (1 + erf(h/sqrt2)), and its two scalings are
    folded into the weights: with u = h/sqrt2 (c_fc's weight and bias divided by sqrt2),
    gelu(h) @ W = (u + u * erf(u)) @ (W / sqrt2), two operations instead of F.gelu, whose fixed
    cost on CPU is several microseconds at one position;
  * for one new position (Decoder.step), every view and buffer that does not change from one
    position to the next is made once, so a step is little more than its arithmetic.
What each of these saves is measured in docs/benchmarks.md ("Sampling speed on a CPU"). minigpt.model is
the version to read; this one is the version to run.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from minigpt.device import cpu_threads
from minigpt.model import GPT, KVCache, rotate


SQRT2 = math.sqrt(2)


def decode_weights(model: GPT) -> list[tuple[torch.Tensor | None, ...]]:
    """Per block, the tensors the lean path needs: Linear weights transposed to (in, out), the MLP's
    scaled by 1/sqrt2 (see above). They are copies, made again for every generate() call."""
    def t(linear: torch.nn.Linear, scale: float = 1.0) -> torch.Tensor:
        return linear.weight.t().contiguous() / scale

    out = []
    for block in model.transformer.h:
        a, m = block.attn, block.mlp
        fc_b = m.c_fc.bias / SQRT2 if m.c_fc.bias is not None else None
        out.append((block.ln_1.weight, block.ln_1.bias, t(a.c_attn), a.c_attn.bias, t(a.c_proj), a.c_proj.bias,
                    block.ln_2.weight, block.ln_2.bias, t(m.c_fc, SQRT2), fc_b, t(m.c_proj, SQRT2), m.c_proj.bias))
    return out


def _addmm(bias: torch.Tensor | None, x: torch.Tensor, weight_t: torch.Tensor, out: torch.Tensor | None = None):
    """bias + x @ weight_t in one operation (a bias of None adds nothing), into `out` if given."""
    return torch.matmul(x, weight_t, out=out) if bias is None else torch.addmm(bias, x, weight_t, out=out)


def _mlp_residual(x: torch.Tensor, C: int, ln2_w, ln2_b, fc_w, fc_b, out_w, out_b) -> torch.Tensor:
    """x + MLP(ln_2(x)) with the folded GELU (see above); x is (N, C)."""
    u = _addmm(fc_b, F.layer_norm(x, (C,), ln2_w, ln2_b), fc_w)  # (N, 4C): the MLP's input / sqrt2
    return _addmm(x if out_b is None else x + out_b, torch.addcmul(u, u, torch.erf(u)), out_w)


def rope_tables(model: GPT) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The RoPE cos and sin tables (block_size, hs/2) of a model with model.position rope, else None."""
    attn = model.transformer.h[0].attn
    return (attn.rope_cos, attn.rope_sin) if attn.rope else None


def lean_forward(model: GPT, weights: list[tuple], idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits (B, V) of the last of the positions idx (B, T), fed into an empty cache (the prompt or a
    rebuild: positions 0 .. T-1, causal). Equals model(idx, kv_cache=cache)[0][:, -1] in eval mode."""
    B, T = idx.size()
    C, nh = model.config.n_embd, model.config.n_head
    hs = C // nh
    if cache.length > 0:
        raise ValueError("lean_forward fills an empty cache; one more position at a time is Decoder.step")
    tr = model.transformer
    x = F.embedding(idx, tr.wte.weight)  # (B, T, C)
    if "wpe" in tr:
        x = x + tr.wpe.weight[:T]
    x = x.view(B * T, C)
    rope = rope_tables(model)
    turn = tuple(table[:T, None, None] for table in rope) if rope else None  # RoPE's cos, sin: (T, 1, 1, hs/2)
    for layer, (ln1_w, ln1_b, attn_w, attn_b, proj_w, proj_b, *mlp) in zip(cache.layers, weights):
        qkv = _addmm(attn_b, F.layer_norm(x, (C,), ln1_w, ln1_b), attn_w).view(B, T, 3, nh, hs)
        if turn:  # queries and keys turned by their positions 0 .. T-1
            qkv[:, :, :2] = rotate(qkv[:, :, :2], *turn)
        k, v = layer.append_kv(qkv[:, :, 1:].permute(0, 3, 1, 2, 4))  # (B, nh, T, hs) each
        y = F.scaled_dot_product_attention(qkv[:, :, 0].transpose(1, 2), k, v, is_causal=T > 1)  # (B, nh, T, hs)
        x = _addmm(x if proj_b is None else x + proj_b, y.transpose(1, 2).reshape(B * T, C), proj_w)  # residual
        x = _mlp_residual(x, C, *mlp)
    x = F.layer_norm(x.view(B, T, C)[:, -1], (C,), tr.ln_f.weight, tr.ln_f.bias)  # (B, C): the last position
    return F.linear(x, model.lm_head.weight)  # (B, V)


class Decoder:
    """An eval-mode model with its KV cache, run on the lean path: `fill` empties the cache and feeds
    it several positions (lean_forward); `step` feeds one more position.

    For `step`, what does not change between positions is made here once: the weights
    (decode_weights); per layer a buffer the Q, K, V projection is written into, with the query and
    the new key/value pair as views of it; and per layer and position p, the cache slot p and the
    keys and values 0..p that position p attends to.
    """

    def __init__(self, model: GPT, batch_size: int, fill_threads: int = 0):
        c = model.config
        self.fill_threads = fill_threads  # CPU threads for fill (0: leave as set); step uses what is set
        B, C, nh = batch_size, c.n_embd, c.n_head
        self.model, self.C, self.block_size = model, C, c.block_size
        self.weights = decode_weights(model)
        self.cache = model.new_kv_cache(B)
        p = model.lm_head.weight
        self.qkv = [torch.empty(B, 3 * C, device=p.device, dtype=p.dtype) for _ in self.weights]
        heads = [buf.view(B, 3, nh, 1, C // nh) for buf in self.qkv]
        self.query = [h[:, 0] for h in heads]  # (B, nh, 1, hs)
        self.query_key = [buf.view(B, 3, nh, C // nh)[:, :2] for buf in self.qkv]  # (B, 2, nh, hs): turned by RoPE
        self.rope = rope_tables(model)
        self.new_kv = [h[:, 1:].permute(0, 2, 3, 1, 4) for h in heads]  # (B, nh, 1, 2, hs)
        positions = range(c.block_size)
        self.slot = [[layer.kv[:, :, pos:pos + 1] for pos in positions] for layer in self.cache.layers]
        self.seen = [[(layer.kv[:, :, :pos + 1, 0], layer.kv[:, :, :pos + 1, 1]) for pos in positions]
                     for layer in self.cache.layers]

    def fill(self, idx: torch.Tensor) -> torch.Tensor:
        """Empty the cache, feed it positions idx (B, T); logits (B, V) of the last."""
        self.cache.reset()
        with cpu_threads(idx.device, self.fill_threads or torch.get_num_threads()):
            return lean_forward(self.model, self.weights, idx, self.cache)

    def step(self, idx: torch.Tensor) -> torch.Tensor:
        """Feed one new position idx (B, 1) at index cache.length; its logits (B, V).

        Equals model(idx, kv_cache=cache)[0][:, -1] in eval mode."""
        pos, C = self.cache.length, self.C
        if pos >= self.block_size:
            raise ValueError(f"KV cache holds {self.block_size} positions; {pos + 1} requested")
        tr = self.model.transformer
        x = F.embedding(idx[:, 0], tr.wte.weight)  # (B, C)
        if "wpe" in tr:
            x = x + tr.wpe.weight[pos]
        turn = (self.rope[0][pos], self.rope[1][pos]) if self.rope else None  # RoPE's cos, sin at pos: the same in every layer
        for i, (ln1_w, ln1_b, attn_w, attn_b, proj_w, proj_b, *mlp) in enumerate(self.weights):
            _addmm(attn_b, F.layer_norm(x, (C,), ln1_w, ln1_b), attn_w, out=self.qkv[i])  # q, k, v
            if turn:
                self.query_key[i].copy_(rotate(self.query_key[i], *turn))
            self.slot[i][pos].copy_(self.new_kv[i])  # the new key and value join the cache
            k, v = self.seen[i][pos]  # (B, nh, pos + 1, hs): every key and value so far
            y = F.scaled_dot_product_attention(self.query[i], k, v)  # (B, nh, 1, hs)
            x = _addmm(x if proj_b is None else x + proj_b, y.reshape(x.size(0), C), proj_w)  # residual
            x = _mlp_residual(x, C, *mlp)
        for layer in self.cache.layers:
            layer.length = pos + 1
        x = F.layer_norm(x, (C,), tr.ln_f.weight, tr.ln_f.bias)
        return F.linear(x, self.model.lm_head.weight)  # (B, V)
