"""Seeing inside the model: attention maps, surprise, exact bits per character, info, plots, TensorBoard.

One tiny model is trained once for the whole file (a few dozen steps); every test reads it. Without
matplotlib only the tests that draw pictures are skipped.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import CONFIGS, run_cli, tiny_config, tiny_sets, write_corpus
from minigpt import checkpoint, inspection as evaluate, scoring, viz
from minigpt.errors import PromptError
from minigpt.evaluation import PROBE_CHARS
from minigpt.checkpoint import load_model
from minigpt.training import train

pictures = pytest.mark.skipif(not viz.has_matplotlib(), reason="drawing pictures needs matplotlib (the plot extra)")

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"  # 61 characters, block_size 32


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny model trained for 12 steps (evaluated twice) with histograms on; its run directory."""
    tmp = tmp_path_factory.mktemp("inspect")
    corpus = write_corpus(tmp / "corpus.txt")
    cfg = tiny_config(tmp, corpus, "train.max_iters=12", "train.eval_interval=6", "train.warmup_iters=2",
                      "train.eval_iters=2", "train.sample_chars=16", "train.histograms=true", "train.threads=1")
    train_keeping_threads(cfg)
    return cfg.run_dir()


def train_keeping_threads(cfg) -> None:
    """Train `cfg` in this process, then give torch back the thread count it had (train.threads changes it)."""
    threads = torch.get_num_threads()
    try:
        train(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)


def cli(*args: str):
    """The real CLI in a subprocess, on one thread (the tiny model gains nothing from more)."""
    return run_cli(*args, env={"OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def loaded(run):
    return load_model(str(run), torch.device("cpu"))


def png_shape(path: Path) -> tuple[int, ...]:
    from matplotlib import image

    assert path.is_file() and path.stat().st_size > 5_000, f"{path} missing or nearly empty"
    return image.imread(path).shape


COLOUR_TOLERANCE = 0.01  # of an RGB channel (0 to 1): 8-bit PNG rounding (seen: 0.004) and a colour map's 256 levels


def read_png(source: Path | bytes) -> np.ndarray:
    """A PNG file or PNG bytes as an RGB array (H, W, 3) of floats from 0 to 1."""
    from matplotlib import image

    return image.imread(io.BytesIO(source) if isinstance(source, bytes) else source, format="png")[:, :, :3]


def cell_colours(figure, picture: np.ndarray, at: tuple[float, float] = (0.0, 0.0)) -> dict[str, np.ndarray]:
    """Each image panel's cell colours (rows, cols, 3) as read from `picture`, keyed by the panel's title.

    `picture` is `figure` as it was saved or logged; the figure's own layout, at its dpi, says where each
    cell lies. `at` moves the point read from each cell's centre (in cells, x then y), away from text on it.
    """
    viz.figure_to_array(figure)  # lays the figure out
    height = picture.shape[0]
    assert picture.shape[:2] == (round(figure.bbox.height), round(figure.bbox.width))
    colours = {}
    for ax in figure.axes:
        if not ax.get_images():
            continue  # the colour bar
        rows, cols = ax.get_images()[0].get_array().shape
        points = ax.transData.transform([(c + at[0], r + at[1]) for r in range(rows) for c in range(cols)])
        y, x = (height - points[:, 1]).astype(int), points[:, 0].astype(int)  # display y runs upwards
        colours[ax.get_title()] = picture[y, x].reshape(rows, cols, 3)
    return colours


def viridis(weights: np.ndarray) -> np.ndarray:
    """The colours attention_figure gives attention weights (viridis, 0 to 1)."""
    from matplotlib import colormaps

    return colormaps["viridis"](weights)[..., :3]


# ----------------------------------------------------------------------------- library

def test_attention_rows_sum_to_one_and_are_causal(loaded):
    result = evaluate.attention(loaded, TEXT)
    assert result.dropped == len(TEXT) - 32 and "".join(result.chars) == TEXT[-32:]
    assert set(result.maps) == {(l, h) for l in range(2) for h in range(2)}
    for weights in result.maps.values():
        w = torch.from_numpy(weights)
        assert w.shape == (32, 32)
        torch.testing.assert_close(w.sum(-1), torch.ones(32))
        assert torch.all(torch.triu(w, diagonal=1) == 0)


def test_attention_refuses_out_of_range_layer_and_head(loaded):
    with pytest.raises(PromptError, match="layer=2 is out of range.*0 to 1"):
        evaluate.attention(loaded, TEXT, layer=2)
    with pytest.raises(PromptError, match="head=-1 is out of range"):
        evaluate.attention(loaded, TEXT, head=-1)


def test_surprise_bits_agree_with_the_model_loss(loaded):
    text = TEXT[:33]  # one window: 32 inputs, 32 targets
    result = evaluate.surprise(loaded, text)
    ids = torch.tensor([loaded.tokenizer.encode(text)])
    _, loss = loaded.model(ids[:, :-1], ids[:, 1:])
    assert len(result.bits) == 32
    assert result.mean_bits * math.log(2) == pytest.approx(loss.item(), rel=1e-5)


def test_strided_windows_score_every_character_once():
    for n, block, stride in [(61, 32, 16), (61, 32, 32), (61, 32, 1), (10, 32, 16), (100, 8, 3)]:
        scored = []
        for start, first in scoring.windows(n, block, stride):
            T = min(block, n - 1)
            scored += list(range(start + 1 + first, start + 1 + T))
        assert scored == list(range(1, n)), (n, block, stride)


def brute_force_nll(model, ids: torch.Tensor, context_start) -> torch.Tensor:
    """Each target j scored alone from ids[context_start(j) : j]."""
    out = []
    for j in range(1, len(ids)):
        logits, _ = model(ids[context_start(j):j][None])
        out.append(F.cross_entropy(logits[0, -1:], ids[j:j + 1]))
    return torch.stack(out)


@torch.no_grad()
def test_exact_eval_equals_brute_force(loaded):
    ids = torch.tensor(loaded.tokenizer.encode(TEXT + TEXT[:20]))  # 81 characters, block_size 32
    block = 32
    full = brute_force_nll(loaded.model, ids, lambda j: max(0, j - block))
    torch.testing.assert_close(scoring.token_nll(loaded.model, ids, stride=1), full, rtol=1e-4, atol=1e-5)
    # Stride 16: target j is read in the window that first covers it (starts 0, 16, ..., end-aligned last).
    plan = list(scoring.windows(len(ids), block, 16))
    owner = {start + 1 + i: start for start, first in plan for i in range(first, block)}
    strided = brute_force_nll(loaded.model, ids, lambda j: owner[j])
    torch.testing.assert_close(scoring.token_nll(loaded.model, ids, stride=16), strided, rtol=1e-4, atol=1e-5)
    assert all(j - owner[j] >= block - 16 for j in owner if j > block)  # enough context everywhere


@pictures
def test_cli_surprise_picture_colours_each_character_by_its_bits(run, loaded, tmp_path):
    """`surprise --out FILE.png`: each scored character's cell is as red as inspection.surprise's bits for it."""
    out = tmp_path / "s.png"
    done = cli("surprise", "--checkpoint", str(run), "--text", TEXT * 2, "--out", str(out))
    assert done.returncode == 0, done.stderr
    height, width, _ = png_shape(out)
    assert width > 300 and height > 100
    expected = evaluate.surprise(loaded, TEXT * 2)
    figure = viz.surprise_figure(expected.chars, expected.bits)
    # Read beside each cell's character, not on it (cells are wide enough: 64 to a row).
    (colours,) = cell_colours(figure, read_png(out), at=(-0.38, 0.0)).values()
    from matplotlib import colormaps

    reds = colormaps["Reds"](np.minimum(np.array(expected.bits) / viz.MAX_BITS, 1.0))[:, :3]
    scored = colours.reshape(-1, 3)[1:1 + len(expected.bits)]  # the first character is context only
    np.testing.assert_allclose(scored, reds, atol=COLOUR_TOLERANCE)


@pictures
@pytest.mark.parametrize("text", ["ab", "To be", TEXT * 3])
def test_surprise_picture_shows_its_whole_title(text):
    """The title fits inside the figure, however short the text (measured with matplotlib's own text extent)."""
    from matplotlib.text import Text

    bits = [1.0 + i % 3 for i in range(len(text) - 1)]
    fig = viz.surprise_figure(list(text), bits)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    titles = [t for t in fig.findobj(Text) if "bits/char" in t.get_text()]
    assert len(titles) == 1
    box, page = titles[0].get_window_extent(renderer), fig.bbox
    assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, (box, page)


def test_surprise_html_escapes_and_shows_bits():
    page = viz.surprise_html(list('<a&"b>\n'), [1.0, 2.0, 3.0, 4.0, 5.0, 9.0], title="t<")
    assert "<a" not in page.split('<div class="text">')[1].replace("<span", "")
    assert "&lt;" in page and "&amp;" in page and "&quot;" in page and "t&lt;" in page
    assert 'title="&amp;: 2.00 bits"' in page and 'title="↵: 9.00 bits"' in page
    assert viz.visible(" ") == "␣" and viz.visible("\n") == "↵" and viz.visible("\x01") == "\\x01"


def events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"images": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


@pictures
def test_tensorboard_holds_attention_images(run):
    """One image per evaluation; the last shows the final model's attention on the probe text, head by head."""
    images = events(run).Images("attention/probe")
    assert [e.step for e in images] == [6, 12] and images[0].width > 300 and images[0].height > 300
    final = load_model(str(run / checkpoint.LAST), torch.device("cpu"))
    probe = evaluate.split_ids(final, "val")[:min(final.config.model.block_size, PROBE_CHARS)].tolist()
    maps = evaluate.attention_of(final.model, probe)
    figure = viz.attention_figure(list(final.tokenizer.decode(probe)), maps, title="attention at step 12",
                                  label_all=False)
    colours = cell_colours(figure, read_png(images[-1].encoded_image_string))
    assert set(colours) == {f"layer {l}, head {h}" for l, h in maps}
    for (l, h), weights in maps.items():
        np.testing.assert_allclose(colours[f"layer {l}, head {h}"], viridis(weights), atol=COLOUR_TOLERANCE)


@pictures
def test_tensorboard_attention_image_shows_each_heads_own_weights(tmp_path):
    """The logged image, read back with TensorBoard's reader: each panel has its own head's colours."""
    from minigpt.tracking import Tracker

    T = 12
    previous = np.eye(T, k=-1)
    previous[0, 0] = 1.0
    maps = {(0, 0): np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None],  # every character so far alike
            (0, 1): np.eye(T),  # itself
            (1, 0): previous,  # the character before
            (1, 1): np.eye(T)[[0] * T]}  # the first character
    tracker = Tracker(tmp_path, start_step=0, total_steps=1, progress=False)
    tracker.attention(1, "attention/probe", list("Speak, speak"), maps)
    tracker.close()
    (logged,) = events(tmp_path).Images("attention/probe")
    figure = viz.attention_figure(list("Speak, speak"), maps, title="attention at step 1", label_all=False)
    colours = cell_colours(figure, read_png(logged.encoded_image_string))
    for (l, h), weights in maps.items():
        np.testing.assert_allclose(colours[f"layer {l}, head {h}"], viridis(weights), atol=COLOUR_TOLERANCE)
    panels = list(colours.values())
    assert all(np.abs(a - b).max() > 0.5 for i, a in enumerate(panels) for b in panels[i + 1:])  # four pictures


@pictures
def test_attention_frames_repaint_the_weights_and_the_step_of_each_evaluation():
    """Later frames of one probe are repainted, not laid out again: each shows its own weights and its own step."""
    T = 10
    chars = list("To be, or ")
    rng = np.random.default_rng(0)

    def weights() -> dict[tuple[int, int], np.ndarray]:
        maps = {(l, h): np.tril(rng.random((T, T))) for l in range(2) for h in range(3)}
        return {key: m / m.sum(axis=1, keepdims=True) for key, m in maps.items()}

    frames = viz.AttentionFrames()
    first, second, third = weights(), weights(), weights()
    pictures_ = [frames.image(chars, first, "attention at step 5"), frames.image(chars, second, "attention at step 10"),
                 frames.image(chars, third, "attention at step 10")]  # RGB, 0 to 255
    figure = frames.figure
    for maps, picture in zip((first, second, third), pictures_):
        laid_out = viz.attention_figure(chars, first, title="attention at step 5", label_all=False)  # where cells lie
        colours = cell_colours(laid_out, picture / 255.0)
        for (l, h), w in maps.items():
            np.testing.assert_allclose(colours[f"layer {l}, head {h}"], viridis(w), atol=COLOUR_TOLERANCE)
    heading = figure.texts[0].get_window_extent(figure.canvas.get_renderer())  # the figure's title
    title_rows = slice(0, picture.shape[0] - int(heading.y0))  # display y runs upwards
    assert (pictures_[0][title_rows] != pictures_[1][title_rows]).any()  # the step in the title changed
    assert (pictures_[1][title_rows] == pictures_[2][title_rows]).all()  # and only the step: same step, same title
    other = frames.image(list("To be, or!"), third, "attention at step 10")  # another probe: a new figure
    assert frames.figure is not figure and other.shape == pictures_[2].shape


def test_tensorboard_holds_text_hparams_and_histograms(run):
    acc = events(run)
    tags = acc.Tags()
    assert any(t.startswith("samples/text") for t in tags["tensors"])
    assert any(t.startswith("weights/") for t in tags["histograms"])
    assert any(t.startswith("grads/") for t in tags["histograms"])
    assert {"hparams/best_val_loss", "hparams/best_val_bpc"} <= set(tags["scalars"])
    plugins = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(plugins)
    session = acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    assert b"model.n_layer" in session


# ----------------------------------------------------------------------------- the CLI

def with_distinct_heads(run: Path, path: Path) -> Path:
    """The run's checkpoint with head 0 of every layer attending evenly (its queries zeroed) and head 1 sharply
    (its queries scaled up), so that their pictures must differ; written to `path`."""
    payload = checkpoint.load(run)
    C, nh = payload["config"]["model"]["n_embd"], payload["config"]["model"]["n_head"]
    hs = C // nh
    for name, tensor in payload["model"].items():
        if name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):  # rows: Q, K, V, each by head
            tensor[0:hs] = 0.0
            tensor[hs:2 * hs] *= 30.0
    checkpoint.save(path, payload)
    return path


@pictures
def test_cli_attention(run, tmp_path):
    """The picture shows each head's own weights: its cells have the colours of inspection.attention's maps."""
    distinct = with_distinct_heads(run, tmp_path / "heads.pt")
    out = tmp_path / "att.png"
    done = cli("attention", "--checkpoint", str(distinct), "--prompt", TEXT, "--layer", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "last 32 characters" in done.stderr
    height, width, _ = png_shape(out)
    assert height > 200 and width > 200
    model = load_model(str(distinct), torch.device("cpu"))
    expected = evaluate.attention(model, TEXT, layer=1)
    even = np.tril(np.ones((32, 32))) / np.arange(1, 33)[:, None]
    np.testing.assert_allclose(expected.maps[(1, 0)], even, atol=1e-6)  # the premise: head 0 attends evenly
    assert np.abs(expected.maps[(1, 1)] - even).max() > 0.3  # and head 1 does not
    figure = viz.attention_figure(expected.chars, expected.maps, title=f"attention of {distinct}")
    colours = cell_colours(figure, read_png(out))
    assert set(colours) == {"layer 1, head 0", "layer 1, head 1"}
    for (l, h), weights in expected.maps.items():
        np.testing.assert_allclose(colours[f"layer {l}, head {h}"], viridis(weights), atol=COLOUR_TOLERANCE)
    assert np.abs(colours["layer 1, head 0"] - colours["layer 1, head 1"]).max() > 0.3
    bad = cli("attention", "--checkpoint", str(run), "--prompt", "Speak", "--head", "7", "--out", str(out))
    assert bad.returncode == PromptError.exit_code
    assert bad.stderr.strip().startswith("error: --head 7 is out of range") and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_cli_surprise_and_eval_agree(run, loaded, tmp_path):
    """The printed mean and the HTML page's bits are inspection.surprise's, and the mean is eval's bits/char."""
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT * 2, encoding="utf-8")
    html_out = tmp_path / "s.html"
    done = cli("surprise", "--checkpoint", str(run), "--file", str(text_file), "--out", str(html_out))
    assert done.returncode == 0, done.stderr
    mean_bits = float(done.stdout.split()[0])
    expected = evaluate.surprise(loaded, TEXT * 2)
    assert len(expected.bits) == len(TEXT) * 2 - 1
    assert mean_bits == pytest.approx(sum(expected.bits) / len(expected.bits), abs=1e-4)  # printed to 4 decimals
    shown = [float(b) for b in re.findall(r'title="[^"]*: (\d+\.\d\d) bits"', html_out.read_text(encoding="utf-8"))]
    assert shown == pytest.approx(expected.bits, abs=0.005)  # each character's bits, in order, to 2 decimals
    evaluated = cli("eval", "--checkpoint", str(run), "--file", str(text_file), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert report["characters"] == len(TEXT) * 2 - 1 and report["stride"] == 16
    assert report["bpc"] == pytest.approx(mean_bits, abs=1e-4)
    bad = cli("surprise", "--checkpoint", str(run), "--text", "Speak", "--file", str(text_file))
    assert bad.returncode == PromptError.exit_code and bad.stderr.startswith("error: pass exactly one of")


def test_cli_eval_val_split_matches_library(run, loaded):
    done = cli("eval", "--checkpoint", str(run), "--split", "val")
    assert done.returncode == 0, done.stderr
    expected = evaluate.evaluate_split(loaded, "val")
    assert done.stdout.startswith(f"val split: {expected.bpc:.4f} bits/char")
    assert expected.characters == loaded.payload["data"]["val_tokens"] - 1
    # The exact val loss is close to the random-batch estimate training saved.
    assert expected.loss == pytest.approx(loaded.payload["best_val_loss"], abs=0.1)
    bad = cli("eval", "--checkpoint", str(run), "--split", "test")
    assert bad.returncode != 0 and bad.stderr.startswith("error: --split must be train or val")


@pytest.fixture(scope="module")
def half_val_run(tmp_path_factory):
    """(config, corpus) of a 2-step run whose val split is half of a ~200 KB corpus (its own prepared data)."""
    tmp = tmp_path_factory.mktemp("eval-split")
    corpus = write_corpus(tmp / "corpus.txt", repeats=1200)
    cfg = tiny_config(tmp, corpus, "train.max_iters=2", "train.eval_interval=2", "train.warmup_iters=1",
                      "train.eval_iters=1", "train.sample_chars=0", "train.threads=1", "data.val_fraction=0.5")
    train_keeping_threads(cfg)
    return cfg, corpus


def test_split_eval_reads_the_memory_mapped_array_in_windows(half_val_run, monkeypatch):
    """No copy of the whole split as int64 (8 bytes a character, on top of the uint8 array): numpy's and Python's
    allocations while scoring stay under 2 bytes a character (a batch of windows at a time)."""
    import tracemalloc

    cfg, _ = half_val_run
    loaded = load_model(str(cfg.run_dir()), torch.device("cpu"))
    n = loaded.payload["data"]["val_tokens"]
    assert n > 100_000
    result = evaluate.evaluate_split(loaded, "val")  # once untraced: imports and first-call caches
    ids = torch.from_numpy(np.fromfile(next((cfg.run_dir().parent / "prepared").iterdir()) / "val.bin", dtype=np.uint8))
    by_hand = scoring.token_nll(loaded.model, ids.long(), stride=16).double().mean().item()
    assert result.characters == n - 1 and result.loss == pytest.approx(by_hand, rel=1e-9, abs=0)
    tracemalloc.start()
    try:
        evaluate.evaluate_split(loaded, "val")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * n, f"evaluating {n:,} characters allocated a peak of {peak:,} bytes"


def test_split_eval_never_prepares_nor_locks(half_val_run, monkeypatch):
    """Reading commands never take the data lock: eval reads a prepared split as it is, and refuses a missing or
    stale one with the command that prepares it, writing nothing."""
    from minigpt import data, lock

    cfg, corpus = half_val_run

    def refuse(*args, **kwargs):
        raise AssertionError("eval prepared the data or took a lock")

    monkeypatch.setattr(data, "prepare", refuse)
    monkeypatch.setattr(lock.DirectoryLock, "__init__", refuse)
    monkeypatch.setattr(data.DirectoryLock, "__init__", refuse)
    loaded = load_model(str(cfg.run_dir()), torch.device("cpu"))
    assert evaluate.evaluate_split(loaded, "val").characters == loaded.payload["data"]["val_tokens"] - 1
    monkeypatch.undo()

    prepared = next((cfg.run_dir().parent / "prepared").iterdir())
    stat = corpus.stat()
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the corpus looks changed: the arrays are stale
    try:
        stale = cli("eval", "--checkpoint", str(cfg.run_dir()), "--split", "val")
    finally:
        os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert stale.returncode == 3, stale.stderr
    assert f"minigpt prepare --config {cfg.run_dir() / 'config.yaml'}" in stale.stderr, stale.stderr
    before = sorted(p.name for p in prepared.iterdir())
    (prepared / "meta.json").rename(prepared / "meta.json.away")
    try:
        missing = cli("eval", "--checkpoint", str(cfg.run_dir()), "--split", "val")
        after = sorted(p.name for p in prepared.iterdir())
    finally:
        (prepared / "meta.json.away").rename(prepared / "meta.json")
    assert missing.returncode == 3 and missing.stderr.startswith("error: ") and "minigpt prepare --config" in missing.stderr
    assert after == sorted(n if n != "meta.json" else "meta.json.away" for n in before)  # nothing written, no .lock


def test_cli_info(run, loaded):
    import yaml

    done = cli("info", "--checkpoint", str(run))
    assert done.returncode == 0, done.stderr
    info = yaml.safe_load(done.stdout)
    # The corpus it was trained on, which the run's name (the config file's, "tiny") does not tell.
    assert info["corpus"] == loaded.payload["data"]["sources"][0] and info["corpus"].endswith("corpus.txt")
    assert info["config"]["name"] == "tiny"
    assert info["step"] == 12 and info["vocab_size"] == loaded.tokenizer.vocab_size
    assert info["vocabulary"] == "".join(loaded.tokenizer.chars) and "\n" in info["vocabulary"]
    assert info["parameters"] == loaded.model.num_params(non_embedding=False)
    assert info["config"]["model"]["n_layer"] == 2 and info["data"]["sources"]
    assert info["best_val_loss"] == pytest.approx(loaded.payload["best_val_loss"])
    bad = cli("info", "--checkpoint", str(run / "missing.pt"))
    assert bad.returncode == 4 and bad.stderr.startswith("error: checkpoint") and "Traceback" not in bad.stderr


@pictures
def test_cli_plot(run, tmp_path):
    out = tmp_path / "loss.png"
    done = cli("plot", "--run", str(run), "--out", str(out))
    assert done.returncode == 0, done.stderr
    height, width, _ = png_shape(out)
    assert (height, width) == (500, 800)
    bad = cli("plot", "--run", str(tmp_path), "--out", str(out))
    assert bad.returncode != 0 and "no TensorBoard event files" in bad.stderr and "Traceback" not in bad.stderr


# ----------------------------------------------------------------------------- characters the font lacks

CJK = "中文的文字，" * 4 + "abc\n"


@pictures
def test_labels_show_code_points_for_characters_the_font_lacks():
    """DejaVu Sans (matplotlib's own font) has no CJK: those labels read U+4E2D, drawing warns about nothing."""
    from matplotlib import rc_context

    chars = list("中a ")
    maps = {(0, 0): np.tril(np.ones((3, 3))) / np.arange(1, 4)[:, None]}
    with rc_context({"font.family": ["DejaVu Sans"]}), warnings.catch_warnings():
        warnings.simplefilter("error")  # a glyph warning would fail the test
        fonts = viz.plot_fonts()
        assert not any(font.get_char_index(ord("中")) for font in fonts)  # the premise: the font lacks it
        figure = viz.attention_figure(chars, maps)
        viz.figure_to_array(figure)
        viz.figure_to_array(viz.surprise_figure(chars, [1.0, 2.0]))
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["U+4E2D", "a", "␣"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["U+4E2D", "a", "␣"]


@pictures
def test_training_and_attention_on_cjk_text_keep_stderr_clean(tmp_path):
    """Training (its attention/probe images) and `attention` on Chinese text: no glyph warnings on stderr."""
    corpus = write_corpus(tmp_path / "cjk.txt", repeats=40, text=CJK)
    args = ["train", "--config", str(CONFIGS / "tiny.yaml")]
    for s in tiny_sets(tmp_path, corpus) + ["train.max_iters=2", "train.eval_interval=2", "train.eval_iters=1",
                                            "train.warmup_iters=0", "train.sample_chars=0", "model.block_size=16"]:
        args += ["--set", s]
    trained = cli(*args)
    assert trained.returncode == 0, trained.stderr
    assert "Glyph" not in trained.stderr and "missing from font" not in trained.stderr, trained.stderr
    assert [e.step for e in events(tmp_path / "run").Images("attention/probe")] == [2]
    out = tmp_path / "att.png"
    drawn = cli("attention", "--checkpoint", str(tmp_path / "run"), "--prompt", "中文的文字", "--out", str(out))
    assert drawn.returncode == 0 and drawn.stderr.strip() == f"wrote {out}", drawn.stderr
    png_shape(out)
