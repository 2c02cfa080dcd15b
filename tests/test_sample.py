"""Sampling: the KV cache computes what the uncached model computes, within and beyond block_size."""

from __future__ import annotations

import pytest
import torch

from minigpt.config import Config, ModelConfig
from minigpt.model import GPT, LayerCache
from minigpt.checkpoint import LoadedModel
from minigpt.decoding import generate, pick_next, rebuild_keep
from minigpt.fastpath import Decoder, lean_forward
from minigpt.generation import sample
from minigpt.errors import PromptError
from minigpt.tokenizer import CharTokenizer

from conftest import CONFIGS, tiny_sets

VOCAB = 20


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest (and steadiest on a shared machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model(block_size: int = 16, seed: int = 0, dtype: torch.dtype = torch.float64, bias: bool = True,
               device: torch.device | str = "cpu", position: str = "learned") -> GPT:
    """A small random model with sharpened logits (so greedy choices are not near-ties), on `device`."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=block_size, dropout=0.0, bias=bias,
                            position=position), VOCAB)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.to(device=device, dtype=dtype).eval()


def greedy(model: GPT, prompt: list[list[int]], n: int, use_cache: bool) -> list[list[int]]:
    idx = torch.tensor(prompt, dtype=torch.long, device=model.lm_head.weight.device)
    out = [t for t in generate(model, idx, n, temperature=0.0, use_cache=use_cache)]
    return torch.cat(out, dim=1).tolist()


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_greedy_cached_equals_uncached_up_to_block_size(device, position):
    model = make_model(block_size=16, device=device, position=position)
    for prompt in ([[3]], [[1, 2, 3, 4, 5]], [[7, 1], [2, 9]]):
        n = 16 - len(prompt[0]) + 1  # the last id is chosen from a full window of block_size positions
        assert greedy(model, prompt, n, use_cache=True) == greedy(model, prompt, n, use_cache=False)


def test_greedy_cached_equals_uncached_in_float32(device):
    model = make_model(block_size=16, seed=3, dtype=torch.float32, device=device)
    assert greedy(model, [[4, 2]], 15, use_cache=True) == greedy(model, [[4, 2]], 15, use_cache=False)


@pytest.mark.parametrize("bias,position", [(True, "learned"), (False, "learned"), (True, "rope")])
def test_lean_path_equals_model_forward_with_cache(device, bias, position):
    """The lean path: a prompt into an empty cache (fill), then two single positions (step), against the modules."""
    model = make_model(block_size=16, dtype=torch.float32, bias=bias, device=device, position=position)
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]], device=device)
    with torch.inference_mode():
        cache = model.new_kv_cache(2)
        decoder = Decoder(model, 2)
        torch.testing.assert_close(decoder.fill(prompt), model(prompt, kv_cache=cache)[0][:, -1])
        for la, lb in zip(cache.layers, decoder.cache.layers):  # the cached keys and values agree too
            torch.testing.assert_close(lb.kv[:, :, :3], la.kv[:, :, :3])
        seq = prompt
        for new in (torch.tensor([[7], [8]], device=device), torch.tensor([[9], [0]], device=device)):
            expected = model(new, kv_cache=cache)[0][:, -1]
            got = decoder.step(new)
            torch.testing.assert_close(got, expected)
            seq = torch.cat([seq, new], dim=1)
            torch.testing.assert_close(got, model(seq)[0][:, -1], rtol=1e-5, atol=1e-5)
        assert cache.length == decoder.cache.length == 5
        with pytest.raises(ValueError, match="empty cache"):
            lean_forward(model, decoder.weights, prompt, decoder.cache)
        decoder.fill(torch.zeros(2, 16, dtype=torch.long, device=device))  # a full window: no room for one more
        with pytest.raises(ValueError, match="holds 16 positions"):
            decoder.step(torch.tensor([[1], [2]], device=device))


def test_beyond_block_size_model_never_sees_more_than_block_size(monkeypatch):
    """Record every write to the KV cache: positions fed plus positions already cached never exceed block_size."""
    model = make_model(block_size=8)
    seen: list[tuple[int, int]] = []
    original_fill, original_step = LayerCache.append_kv, Decoder.step  # every way positions enter the cache

    def recording_fill(self, kv):
        seen.append((kv.size(2), self.length))
        return original_fill(self, kv)

    def recording_step(self, idx):
        seen.append((idx.size(1), self.cache.length))
        return original_step(self, idx)

    monkeypatch.setattr(LayerCache, "append_kv", recording_fill)
    monkeypatch.setattr(Decoder, "step", recording_step)
    out = greedy(model, [[1, 2, 3]], 40, use_cache=True)
    assert len(out[0]) == 40
    assert seen and all(t + cached <= 8 for t, cached in seen)
    assert any(t == rebuild_keep(8) and cached == 0 for t, cached in seen[1:])  # rebuilt from the window's last half


def test_pick_next_draws_each_id_with_its_probability():
    """20,000 draws in one batch: frequencies match the softmax; ids outside the top k never come up."""
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.5]]).repeat(20000, 1)
    generator = torch.Generator().manual_seed(0)
    ids = pick_next(logits, 1.0, None, generator)[:, 0]
    freq = torch.bincount(ids, minlength=5).double() / len(ids)
    expected = torch.softmax(logits[0].double(), dim=0)
    assert (freq - expected).abs().max() < 0.012  # 4 standard deviations of a frequency near 0.5 at n = 20,000
    hot = pick_next(logits, 0.5, None, generator)[:, 0]  # temperature 0.5 sharpens toward id 2
    assert torch.bincount(hot, minlength=5)[2] > torch.bincount(ids, minlength=5)[2]
    top2 = pick_next(logits, 1.0, 2, generator)[:, 0]
    assert set(top2.tolist()) == {1, 2}
    assert abs((top2 == 2).double().mean().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 0.012


def reference_rebuild_strategy(model: GPT, prompt: list[int], n: int) -> list[int]:
    """The documented strategy without a cache: a window that grows to block_size, then restarts
    from its last half; every id comes from a full forward over the current window."""
    block, keep = model.config.block_size, rebuild_keep(model.config.block_size)
    window, out = prompt[-block:], []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([window], device=model.lm_head.weight.device))
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            if len(window) == block:
                window = window[-keep + 1:] if keep > 1 else []
            window = window + [nxt]
    return out


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_beyond_block_size_cached_follows_the_documented_strategy(device, position):
    model = make_model(block_size=8, device=device, position=position)
    assert greedy(model, [[1, 2, 3]], 40, use_cache=True)[0] == reference_rebuild_strategy(model, [1, 2, 3], 40)


def loaded(model: GPT) -> LoadedModel:
    chars = [chr(ord("a") + i) for i in range(VOCAB)]
    return LoadedModel(model, CharTokenizer(chars), Config(), {})


def test_num_samples_are_one_batch_and_seeds_reproduce(monkeypatch):
    model = make_model(block_size=16, dtype=torch.float32)
    batches: list[int] = []
    original = GPT.new_kv_cache

    def recording(self, batch_size):
        batches.append(batch_size)
        return original(self, batch_size)

    monkeypatch.setattr(GPT, "new_kv_cache", recording)
    texts = sample(loaded(model), "abc", 30, 1.0, None, num_samples=4, seed=7)
    assert batches == [4] and len(texts) == 4
    assert all(t.startswith("abc") and len(t) == 33 for t in texts)
    assert len(set(texts)) > 1  # independent samples differ
    assert sample(loaded(model), "abc", 30, 1.0, None, num_samples=4, seed=7) == texts
    assert sample(loaded(model), "abc", 30, 1.0, None, num_samples=4, seed=8) != texts


def test_seeded_sampling_with_and_without_cache_is_reproducible(device):
    model = make_model(block_size=16, dtype=torch.float32, device=device)
    one = sample(loaded(model), "ab", 40, 0.8, 5, num_samples=1, seed=1, use_cache=False)
    two = sample(loaded(model), "ab", 40, 0.8, 5, num_samples=1, seed=1, use_cache=False)
    assert one == two
    cached = sample(loaded(model), "ab", 40, 0.8, 5, num_samples=2, seed=1)
    assert cached == sample(loaded(model), "ab", 40, 0.8, 5, num_samples=2, seed=1)


def test_training_mode_uses_the_module_path(monkeypatch):
    """With dropout active (training mode) generate runs model(ids, kv_cache=...), never the lean Decoder; in eval
    mode the Decoder runs and the module path does not (so the recording below can tell the two apart)."""
    from minigpt import decoding as sample_mod

    calls = {"module": 0, "decoder": 0}
    real_forward = GPT.forward

    def forward(self, idx, targets=None, kv_cache=None):
        calls["module"] += kv_cache is not None
        return real_forward(self, idx, targets, kv_cache)

    class RecordingDecoder(Decoder):
        def __init__(self, *args, **kwargs):
            calls["decoder"] += 1
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(GPT, "forward", forward)
    monkeypatch.setattr(sample_mod, "Decoder", RecordingDecoder)
    model = make_model(block_size=8, dtype=torch.float32).train()
    out = greedy(model, [[1]], 20, use_cache=True)
    assert len(out[0]) == 20
    assert calls["decoder"] == 0 and calls["module"] >= 20  # one cached forward per new character (plus rebuilds)
    calls.update(module=0, decoder=0)
    greedy(model.eval(), [[1]], 20, use_cache=True)
    assert calls["decoder"] == 1 and calls["module"] == 0


def test_cached_steps_run_on_one_cpu_thread_fills_and_uncached_on_all(monkeypatch):
    """The thread policy of generate(): one thread per cached step, every thread for whole windows; restored after."""
    from minigpt import fastpath as sample_mod

    torch.set_num_threads(2)  # the autouse fixture restores its own setting afterwards
    model = make_model(block_size=8, dtype=torch.float32)
    seen: dict[str, set[int]] = {"fill": set(), "step": set(), "uncached": set()}
    original_fill, original_step, original_trunk = sample_mod.lean_forward, Decoder.step, GPT._trunk

    def fill(*args):
        seen["fill"].add(torch.get_num_threads())
        return original_fill(*args)

    def step(self, idx):
        seen["step"].add(torch.get_num_threads())
        return original_step(self, idx)

    def trunk(self, *args, **kwargs):
        seen["uncached"].add(torch.get_num_threads())
        return original_trunk(self, *args, **kwargs)

    monkeypatch.setattr(sample_mod, "lean_forward", fill)
    monkeypatch.setattr(Decoder, "step", step)
    greedy(model, [[1, 2]], 30, use_cache=True)  # 30 characters in a window of 8: several rebuilds
    assert torch.get_num_threads() == 2
    monkeypatch.setattr(GPT, "_trunk", trunk)
    greedy(model, [[1, 2]], 5, use_cache=False)
    assert seen == {"fill": {2}, "step": {1}, "uncached": {2}} and torch.get_num_threads() == 2


# ----------------------------------------------------------------------------- top-p and stop strings

def test_top_p_draws_only_from_the_nucleus_with_renormalised_frequencies():
    """20,000 seeded draws: nothing outside the nucleus, frequencies inside it match the renormalised softmax."""
    logits = torch.tensor([[2.0, 0.3, 1.2, -1.0, 0.9, -0.4]])
    probs = torch.softmax(logits[0].double(), dim=0)
    order = probs.argsort(descending=True).tolist()
    for top_p in (0.3, 0.6, 0.85, 0.97):
        # The nucleus, counted out by hand: the most likely ids until their mass reaches top_p.
        nucleus, mass = [], 0.0
        for i in order:
            nucleus.append(i)
            mass += float(probs[i])
            if mass >= top_p:
                break
        generator = torch.Generator().manual_seed(int(top_p * 100))
        ids = pick_next(logits.repeat(20000, 1), 1.0, None, generator, top_p=top_p)[:, 0]
        assert set(ids.tolist()) <= set(nucleus), (top_p, nucleus)
        freq = torch.bincount(ids, minlength=6).double() / len(ids)
        expected = torch.zeros(6, dtype=torch.float64)
        expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
        assert (freq - expected).abs().max() < 0.012, (top_p, freq, expected)  # 4 standard deviations at n = 20,000
        assert len(set(ids.tolist())) == len(nucleus)  # and every id of the nucleus does come up


def test_top_p_one_is_plain_sampling_and_a_tiny_top_p_is_greedy():
    logits = torch.randn(500, 12, generator=torch.Generator().manual_seed(0))
    plain = pick_next(logits, 1.0, None, torch.Generator().manual_seed(3))
    assert torch.equal(pick_next(logits, 1.0, None, torch.Generator().manual_seed(3), top_p=1.0), plain)
    tiny = pick_next(logits, 0.7, None, torch.Generator().manual_seed(3), top_p=1e-6)
    assert torch.equal(tiny, logits.argmax(dim=-1, keepdim=True))


def reference_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text up to the first place it ends with a stop string, that string removed."""
    for end in range(1, len(text) + 1):
        for stop in stops:
            if text[:end].endswith(stop):
                return text[:end - len(stop)], True
    return text, False


def test_stop_filter_releases_text_as_soon_as_it_cannot_start_a_stop_string():
    import random

    from minigpt.generation import StopFilter

    rng = random.Random(0)
    for _ in range(300):
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 30)))
        f, shown, fed = StopFilter(stops), "", ""
        for ch in text:
            shown += f.feed(ch)
            fed += ch
            if f.stopped:
                break
            assert len(fed) - len(shown) < max(map(len, stops))  # held back: at most a stop string's prefix
        shown += "" if f.stopped else f.flush()
        assert (shown, f.stopped) == reference_stop(text, stops), (stops, text)


def test_sample_with_stop_ends_where_the_unstopped_text_shows_the_stop_string():
    model = make_model(block_size=16, dtype=torch.float32)
    full = sample(loaded(model), "ab", 60, 1.0, None, 1, seed=5)[0]
    stop = full[2:][20:22]  # two characters the unstopped continuation writes
    expected = "ab" + full[2:][:full[2:].index(stop)]
    pieces: list[str] = []
    got = sample(loaded(model), "ab", 60, 1.0, None, 1, seed=5, stop=[stop], on_text=lambda _, p: pieces.append(p))
    assert got == [expected] and "".join(pieces) == expected
    assert sample(loaded(model), "ab", 60, 1.0, None, 1, seed=5, stop=["no such text"]) == [full]
    with pytest.raises(PromptError, match="stop takes non-empty strings"):
        sample(loaded(model), "ab", 5, 1.0, None, 1, seed=5, stop=[""])
    with pytest.raises(PromptError, match="top_p must be a probability mass"):
        sample(loaded(model), "ab", 5, 1.0, None, 1, seed=5, top_p=1.5)


def test_example_prompt_is_a_whole_line_from_the_text():
    from minigpt.training import example_prompt

    assert example_prompt("ther.\n\nGREMIO:\nGood morrow, neighbour\n") == "GREMIO:"
    assert example_prompt("and so\nit goes on and on and on and on forever\nx\n") == "it goes on and on and on"
    assert example_prompt("no newline at all") == "no newline at all"


def test_the_sample_hint_of_a_binary_corpus_can_be_pasted_into_a_shell(tmp_path):
    """data.errors=replace on random bytes: the printed `sample:` command holds only printable characters (no NULs,
    no control bytes, no U+FFFD), and it runs."""
    import random
    import shlex

    from typer.testing import CliRunner

    from minigpt.cli import app
    from minigpt.training import example_prompt

    rng = random.Random(3)
    binary = "".join(chr(rng.randrange(256)) for _ in range(400)).replace("\n", "")  # no line is readable
    assert example_prompt(binary).isprintable() and "\ufffd" not in example_prompt(binary)
    assert example_prompt("\x00\x01\n\ufffd\x7f\n") == ""  # nothing readable at all: no prompt
    assert example_prompt("\x00\x01\nABC\x02\nGood line\n\x03") == "Good line"

    corpus = tmp_path / "random.bin"
    corpus.write_bytes(rng.randbytes(20_000))
    args = ["train", "--config", str(CONFIGS / "tiny.yaml")]
    for item in tiny_sets(tmp_path, corpus) + ["data.errors=replace", "train.max_iters=2", "train.eval_interval=2",
                                               "train.warmup_iters=0", "train.eval_iters=1", "train.sample_chars=0"]:
        args += ["--set", item]
    runner = CliRunner()
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    hint = next(line for line in done.stderr.splitlines() if "sample:" in line).split("sample:", 1)[1].strip()
    assert hint.isprintable() and "\ufffd" not in hint, repr(hint)
    words = shlex.split(hint)
    assert words[:4] == ["minigpt", "sample", "--checkpoint", str(tmp_path / "run")]
    sampled = runner.invoke(app, words[1:] + ["-n", "5"])
    assert sampled.exit_code == 0, sampled.output


def test_a_stop_or_a_reader_that_stops_early_restores_the_thread_count():
    model = make_model(block_size=16, dtype=torch.float32)
    torch.set_num_threads(2)  # the autouse fixture restores its own setting afterwards
    full = sample(loaded(model), "ab", 30, 1.0, None, 1, seed=5)[0]
    sample(loaded(model), "ab", 30, 1.0, None, 1, seed=5, stop=[full[5]])
    assert torch.get_num_threads() == 2
    from minigpt.generation import stream

    pieces = stream(loaded(model), "ab", 30, 1.0, None, 1, seed=5)
    next(pieces), next(pieces)  # the prompt and one character: generation is under way, on one thread
    assert torch.get_num_threads() == 1
    pieces.close()
    assert torch.get_num_threads() == 2
