"""The rule behind `auto`: which model to train for a time budget, a corpus and a machine.

A model that is too small stops learning long before the budget ends; one that is too large
takes so few steps that it is still far from trained. Between the two, the scaling study
(docs/scaling.md: fixed step counts of shapes from 0.2M to 4.8M parameters on Tiny Shakespeare
and on 12 MB of Python source) found the best shape for every budget where it had trained on
about TOKENS_PER_PARAM characters per parameter, stronger weight decay paying off once the corpus
was seen more than a few times, and dropout (which costs time) once it was seen many times. So,
given the step time of each candidate shape measured on this machine:

    steps(shape)  = the budget's training time / the shape's measured seconds per step
    tokens(shape) = steps * batch_size * block_size
    choose the largest shape with tokens >= TOKENS_PER_PARAM * parameters (else the smallest)
    weight decay  = 0.1, or 0.3 from 4 passes over the training split on (free, unlike dropout)
    dropout       = from the epochs that many tokens make of the training split

Fine-tuning keeps the model it starts from (and its weight decay) and picks what the new corpus's
size asks for: a lower learning rate, dropout when the corpus is small, an evaluation about every
pass over it and early stopping (train.patience) when validation stops improving. Everything here
is pure arithmetic; minigpt.autosize measures the machine and applies the choice to a config.
"""

from __future__ import annotations

from dataclasses import dataclass

# (n_layer, n_embd) from small to large; heads are HEAD_SIZE channels wide (64 from 384 up, as GPT-2)
LADDER = ((2, 96), (3, 128), (4, 160), (4, 192), (5, 224), (6, 256), (6, 320), (6, 384), (8, 512), (12, 768))
HEAD_SIZE = 32
TOKENS_PER_PARAM = 3.0  # characters per parameter: the best shapes saw 3.5 to 7, larger ones at 2.6 or fewer lost (docs/scaling.md)
TRAINED_FRACTION = 0.85  # of a budget's time left after start-up that the steps get (evaluations, margin)
BLOCK_SIZE = 128  # context of every shape below 384 wide (the study's); 256 from 384 up (the GPU config's)
CPU_BATCH, ACCELERATOR_BATCH = 16, 64  # sequences per step: the study's on CPU, the GPU config's on CUDA and MPS
LEARNING_RATE = {"muon": 6e-3, "adamw": 1e-3}  # the study's for Muon; the GPU config's for AdamW
FINE_TUNE_LR_FACTOR = 0.2  # fine-tuning starts from a trained model: a fifth of its learning rate (of 1, 0.2, 0.05)
FINE_TUNE_DROPOUT = 0.1  # dropout when fine-tuning on fewer than 1M characters (better than none in the study)
SMALL_CORPUS = 200_000  # characters below which a fresh run also evaluates every pass and stops early
PATIENCE = 3  # evaluations without a better val loss before a fine-tuning run (or one on a small corpus) stops


@dataclass(frozen=True)
class Shape:
    """One candidate network."""

    n_layer: int
    n_embd: int
    n_head: int

    def params(self, vocab_size: int) -> int:
        """Parameters of a GPT of this shape (RoPE, tied embedding): 12 C^2 per block, the embedding and norms."""
        c = self.n_embd
        return self.n_layer * (12 * c * c + 13 * c) + vocab_size * c + 2 * c

    def describe(self) -> str:
        return f"{self.n_layer} layers x {self.n_embd} ({self.n_head} heads)"


def heads_for(n_embd: int, rope: bool) -> int:
    """The head count for a width: heads HEAD_SIZE (64 from 384 up) channels wide where that divides, else
    the divisor of the width nearest to it (with an even head size for RoPE)."""
    size = 64 if n_embd >= 384 else HEAD_SIZE
    counts = [n for n in range(1, n_embd + 1) if n_embd % n == 0 and not (rope and (n_embd // n) % 2)]
    return min(counts, key=lambda n: (abs(n_embd // n - size), n))


def candidates(n_layer: int | None, n_embd: int | None, n_head: int | None, rope: bool) -> list[Shape]:
    """The ladder's shapes with the user's explicit keys in place of the ladder's (None = auto), smallest first."""
    shapes = []
    for layers, width in LADDER:
        layers, width = n_layer or layers, n_embd or width
        if n_head and (width % n_head or (rope and (width // n_head) % 2)):
            continue  # a width the user's head count does not divide
        shape = Shape(layers, width, n_head or heads_for(width, rope))
        if shape not in shapes:
            shapes.append(shape)
    if not shapes:  # a head count no ladder width takes: widths made of heads HEAD_SIZE wide
        shapes = [Shape(n_layer or layers, n_head * HEAD_SIZE, n_head) for layers, _ in LADDER[:1]]
    return sorted(shapes, key=lambda s: s.n_layer * s.n_embd ** 2)


def block_size_for(n_embd: int) -> int:
    return BLOCK_SIZE if n_embd < 384 else 2 * BLOCK_SIZE


def batch_size_for(device_type: str) -> int:
    return CPU_BATCH if device_type == "cpu" else ACCELERATOR_BATCH


def trained_steps(budget_left_s: float, step_s: float) -> int:
    """The steps a budget with `budget_left_s` seconds left will take at `step_s` seconds each."""
    return max(1, int(TRAINED_FRACTION * budget_left_s / step_s))


def enough_tokens(tokens: float, params: int) -> bool:
    """Whether a shape trained on `tokens` characters is not too large for them (the study's ratio)."""
    return tokens >= TOKENS_PER_PARAM * params


DROPOUT_FREE_PASSES = 8  # 4x160 at 4.4 passes lost 0.036 nats with dropout 0.1; 4x192 at 6.2 gained 0.007


def dropout_for(epochs: float) -> float:
    """Dropout for a run that passes over its training split `epochs` times (fitted; none while data is fresh)."""
    if epochs <= DROPOUT_FREE_PASSES:
        return 0.0
    return 0.1 if epochs <= 16 else 0.2


WEIGHT_DECAY = 0.1  # AdamW's usual decoupled weight decay (GPT-2, nanoGPT), while the text is fairly fresh
REPEATED_WEIGHT_DECAY = 0.3  # from PLAIN_PASSES passes on: 0.026 nats better at 6.0 and 7.5 passes, 0.011 worse at 2.9
PLAIN_PASSES = 4


def weight_decay_for(epochs: float) -> float:
    """Weight decay for a run that passes over its training split `epochs` times: stronger once text repeats.

    Unlike dropout it costs no time, so it is the first regulariser the rule reaches for."""
    return WEIGHT_DECAY if epochs < PLAIN_PASSES else REPEATED_WEIGHT_DECAY


EVALUATIONS = (3, 10)  # a run's evaluations: at least enough for a curve, at most ten
EVAL_SHARE = 0.03  # of the steps' time that the evaluations' loss estimates may take, before there are fewer


def eval_interval_for(steps: int, eval_iters: int) -> int:
    """Steps between evaluations of a run of `steps`: about ten, fewer (down to three) where they would cost
    more than EVAL_SHARE of its steps' time. Each estimates the loss on 2 x eval_iters batches, forward only,
    about a third of a step each (a 5-minute float32 run of 1,800 steps: ten cost 15% of its time, four 6%)."""
    each = 2 * eval_iters / 3  # an evaluation's cost, in steps
    n = min(EVALUATIONS[1], max(EVALUATIONS[0], round(EVAL_SHARE * steps / each)))
    return max(50, int(round(steps / n, -1)))


def pass_eval_interval(train_chars: int, tokens_per_step: int) -> int:
    """Steps between evaluations of a run that stops early: about one pass over its corpus (10 to 500)."""
    return max(10, min(500, round(train_chars / tokens_per_step)))


def fine_tune_dropout(train_chars: int) -> float:
    """Dropout for fine-tuning on a corpus of `train_chars` characters: small corpora are passed over many times."""
    return FINE_TUNE_DROPOUT if train_chars < 1_000_000 else 0.0


def rate_text(tokens_per_s: float) -> str:
    return f"{tokens_per_s / 1000:.0f}k tok/s" if tokens_per_s >= 1000 else f"{tokens_per_s:.0f} tok/s"


def chars_text(chars: int) -> str:
    return f"{chars / 1e6:.1f}M characters" if chars >= 100_000 else f"{chars:,} characters"
