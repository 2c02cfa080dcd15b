"""A GPT language model, written to be read beside a notebook on attention.

The network, from the bottom up (shape letters: B batch, T time, C channels = n_embd,
nh heads, hs = C // nh head size, V vocabulary size):

    token ids (B, T)
    -> token embedding wte + position embedding wpe, added          (B, T, C)
       (with model.position rope: wte alone; positions turn q and k in attention)
    -> n_layer blocks, each (pre-norm, residual):
           x = x + attn(ln_1(x))     masked multi-head self-attention
           x = x + mlp(ln_2(x))      Linear(C, 4C) -> GELU -> Linear(4C, C)
    -> final LayerNorm ln_f -> lm_head, tied to wte                  (B, T, V)

The ideas come from "Attention Is All You Need" (Vaswani et al., 2017) and GPT-2 (Radford et
al., 2019): pre-norm blocks, learned positions, weight tying, and residual projections whose
initial weights shrink with depth. With `model.position: rope` there is no wpe: instead each
query and key is rotated by an angle that grows with its position (RoPE, Su et al., 2021), so
a score depends on how far apart two characters are rather than where they stand; on the CPU
config that learns faster (docs/training.md). Attention is spelled out step by step in
`CausalSelfAttention.forward`; beside it sits the fused `F.scaled_dot_product_attention`, which
computes the same thing faster and is used whenever the attention weights are not requested.

`KVCache` keeps each layer's keys and values for sampling, so each new character costs one
position's work instead of the whole context's.

This file is pure: no file I/O, no printing, no config files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn import functional as F

from minigpt.config import ModelConfig


@dataclass
class LayerCache:
    """One layer's cached keys and values, side by side in one buffer (B, nh, block_size, 2, hs); the
    first `length` positions are filled. Keeping them together lets the sampler store both with one copy."""

    kv: torch.Tensor
    length: int = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' keys and values (B, nh, T, hs); return all keys and values so far."""
        return self.append_kv(torch.stack([k, v], dim=3))

    def append_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' keys and values given together, (B, nh, T, 2, hs); return all so far."""
        end = self.length + kv.size(2)
        if end > self.kv.size(2):
            raise ValueError(f"KV cache holds {self.kv.size(2)} positions; {end} requested")
        self.kv[:, :, self.length:end] = kv
        self.length = end
        return self.kv[:, :, :end, 0], self.kv[:, :, :end, 1]  # (B, nh, end, hs) each


@dataclass
class KVCache:
    """Keys and values of every layer for the positions already processed."""

    layers: list[LayerCache] = field(default_factory=list)

    @property
    def length(self) -> int:
        """How many positions are cached (the next position's index)."""
        return self.layers[0].length

    def reset(self) -> None:
        """Forget every cached position (the buffers are reused)."""
        for layer in self.layers:
            layer.length = 0


def rotary_angles(block_size: int, hs: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angle by which RoPE turns each pair of channels at each position, (block_size, hs/2) each.

    Pair i (channels i and i + hs/2) turns by position * base^(-2i/hs) radians: the first pairs turn
    fast and tell neighbours apart, the last turn slowly and tell far-apart positions apart."""
    speed = base ** (-torch.arange(hs // 2, dtype=torch.float32) * 2 / hs)  # (hs/2,) radians per position
    angle = torch.arange(block_size, dtype=torch.float32)[:, None] * speed[None, :]  # (block_size, hs/2)
    return angle.cos(), angle.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn each pair of channels (i, i + hs/2) of x (..., hs) by its angle; cos and sin broadcast to (..., hs/2).

    Rotating a query at position i and a key at position j leaves their dot product depending only on
    i - j: a rotation by angle a then by -b is a rotation by a - b."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position attends only to itself and the past."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # Q, K, V in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)  # output projection
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.fused = True  # use F.scaled_dot_product_attention when weights are not requested
        # mask[i, j] is True where query i may look at key j (j <= i): a lower-triangular matrix.
        mask = torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool))
        self.register_buffer("mask", mask.view(1, 1, config.block_size, config.block_size), persistent=False)
        self.rope = config.position == "rope"
        if self.rope:  # a table, not parameters: rebuilt here, not saved in checkpoints
            cos, sin = rotary_angles(config.block_size, config.n_embd // config.n_head)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hs/2)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, return_weights: bool = False,
                cache: LayerCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend over the sequence; optionally return the attention weights (B, nh, T, S)."""
        B, T, C = x.size()
        nh, hs = self.n_head, C // self.n_head

        # 1. Project every position to a query, a key and a value.
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        # 2. Split the channels into nh heads of hs channels each.
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        past = cache.length if cache is not None else 0  # positions already in the cache (sampling)
        if self.rope:
            # 2b. RoPE: turn each query and key by angles set by its position (past .. past + T - 1).
            cos, sin = self.rope_cos[past:past + T], self.rope_sin[past:past + T]  # (T, hs/2)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # (B, nh, T, hs) each
        if cache is not None:  # sampling: prepend the keys and values of earlier positions
            k, v = cache.append(k, v)  # (B, nh, S, hs) with S = past + T
        S = k.size(2)

        weights = None
        if self.fused and not return_weights:
            # The same computation as the explicit path below, in one fused kernel.
            y = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=None if (past == 0 or T == 1) else self.mask[:, :, past:S, :S],
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=(past == 0 and T > 1),
            )  # (B, nh, T, hs)
        else:
            # 3. Scores: how well each query matches each key, scaled by 1/sqrt(hs).
            att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, S)
            # 4. Causal mask: a query may not see keys from its future.
            att = att.masked_fill(~self.mask[:, :, past:S, :S], float("-inf"))
            # 5. Softmax over the keys turns scores into weights that sum to 1.
            att = F.softmax(att, dim=-1)  # (B, nh, T, S)
            weights = att if return_weights else None
            att = self.attn_dropout(att)
            # 6. Each position's output is the weighted sum of the values.
            y = att @ v  # (B, nh, T, hs)
        # 7. Merge the heads back into C channels and project.
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        y = self.resid_dropout(self.c_proj(y))
        return y, weights


class MLP(nn.Module):
    """Position-wise feed-forward network: widen 4x, GELU, project back."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    """One transformer block: communication (attention) then computation (MLP), each pre-normed."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, return_weights: bool = False,
                cache: LayerCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, weights = self.attn(self.ln_1(x), return_weights, cache)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, weights


class GPT(nn.Module):
    """The language model: predicts, at every position, a distribution over the next character."""

    def __init__(self, config: ModelConfig, vocab_size: int):
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        if config.position == "rope":  # positions enter inside attention instead
            del self.transformer["wpe"]
        self.lm_head = nn.Linear(config.n_embd, vocab_size, bias=False)
        # Weight tying: the same matrix embeds a character and scores it as the next one.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * n_layer),
        # so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings excluded by default (tied wte counts once)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def set_fused_attention(self, fused: bool) -> None:
        """Choose the fused (fast) or explicit (step-by-step) attention in every block."""
        for block in self.transformer.h:
            block.attn.fused = fused

    def _trunk(self, idx: torch.Tensor, kv_cache: KVCache | None,
               return_weights: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Embeddings and blocks: token ids (B, T) -> final hidden states (B, T, C)."""
        B, T = idx.size()
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} positions exceeds block_size {self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, C)
        if "wpe" in self.transformer:  # learned positions (with RoPE, positions enter inside attention)
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
            x = x + self.transformer.wpe(pos)  # (B, T, C): (T, C) broadcast over the batch
        x = self.transformer.drop(x)
        maps = []
        for i, block in enumerate(self.transformer.h):
            x, weights = block(x, return_weights, kv_cache.layers[i] if kv_cache is not None else None)
            if weights is not None:
                maps.append(weights)
        return self.transformer.ln_f(x), maps

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) for every position and, given targets (B, T), the mean cross-entropy."""
        x, _ = self._trunk(idx, kv_cache, return_weights=False)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """The attention weights of every layer, from the explicit path: n_layer x (B, nh, T, T)."""
        _, maps = self._trunk(idx, None, return_weights=True)
        return maps

    def new_kv_cache(self, batch_size: int) -> KVCache:
        """Empty key/value buffers for `batch_size` sequences of up to block_size positions."""
        c = self.config
        p = self.lm_head.weight
        shape = (batch_size, c.n_head, c.block_size, 2, c.n_embd // c.n_head)
        return KVCache([LayerCache(torch.empty(shape, device=p.device, dtype=p.dtype)) for _ in range(c.n_layer)])

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: decay matrices (weights, embeddings), not biases or norm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
