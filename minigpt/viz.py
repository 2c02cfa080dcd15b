"""Pictures of a model: attention heatmaps, per-character surprise, loss curves.

Figures are drawn with matplotlib's object API on the non-interactive Agg canvas (no pyplot,
no window, no global state). matplotlib is an optional extra (`pip install 'minigpt[plot]'`),
imported only when a picture is asked for. The surprise view is also written as HTML, which
needs nothing: each character is a span coloured by its bits, with the bits in its tooltip.

A character the plot font cannot draw (CJK in the default DejaVu Sans, for example) is labelled
by its code point, `U+4E2D`, instead of an empty box, and matplotlib's "Glyph ... missing from
font" warnings are kept off stderr.
"""

from __future__ import annotations

import html
import math
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from minigpt.errors import DataError, MiniGPTError

VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}
MAX_BITS = 8.0  # surprise at or above this many bits gets the strongest colour
WRAP = 64  # characters per row in the surprise picture


def visible(ch: str) -> str:
    """A character as a label: whitespace and control characters made visible."""
    if ch in VISIBLE:
        return VISIBLE[ch]
    if not ch.isprintable():
        return f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}"
    return ch


def plot_fonts(family: list[str] | None = None) -> list[Any]:
    """The fonts matplotlib draws text of `family` with (default: rcParams font.family), in its order of fallback."""
    from matplotlib import font_manager, rcParams

    paths = []
    for name in family or rcParams["font.family"]:
        try:  # as matplotlib picks them: the best match of each listed family, none if it is not installed
            paths.append(font_manager.findfont(font_manager.FontProperties(family=[name]), fallback_to_default=False))
        except ValueError:
            continue
    return [font_manager.get_font(path) for path in dict.fromkeys(paths)]


def plot_label(ch: str, fonts: list[Any]) -> str:
    """A character as a picture label: made visible, or its code point (U+4E2D) where no font can draw it."""
    label = visible(ch)
    if all(any(font.get_char_index(ord(c)) for font in fonts) for c in label):
        return label
    return f"U+{ord(ch):04X}"


@contextmanager
def _no_glyph_warnings():
    """Drawing: matplotlib warns once per glyph a font lacks; the labels already say those characters."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font")
        yield


def _matplotlib() -> tuple[Any, Any]:
    """matplotlib's Figure class and Agg canvas, or a MiniGPTError saying how to install it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MiniGPTError("drawing pictures needs matplotlib: pip install 'minigpt[plot]' (or pip install matplotlib)") from exc
    return Figure, FigureCanvasAgg


def has_matplotlib() -> bool:
    """Whether figures can be drawn."""
    try:
        _matplotlib()
    except MiniGPTError:
        return False
    return True


def attention_figure(chars: list[str], maps: dict[tuple[int, int], np.ndarray], title: str = "",
                     label_all: bool | None = None) -> Any:
    """A grid of heatmaps, one per (layer, head): rows are queries, columns the keys they attend to.

    Every panel's axes carry the characters when `label_all` (default: for up to 4 panels); otherwise
    only the outer edges do, which is also much faster to draw.
    """
    Figure, FigureCanvasAgg = _matplotlib()
    layers = sorted({l for l, _ in maps})
    heads = sorted({h for _, h in maps})
    T = len(chars)
    panel = max(2.5, min(6.0, 0.16 * T + 1.0))  # inches per heatmap, growing with the prompt
    fig = Figure(figsize=(panel * len(heads) + 1.2, panel * len(layers) + (0.6 if title else 0.2)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(layers), len(heads), squeeze=False)
    fonts = plot_fonts()
    labels = [plot_label(c, fonts) for c in chars]
    long_labels = any(len(label) > 1 for label in labels)  # code points: written upwards, so they do not overlap
    fontsize = max(4.0, min(9.0, 300.0 / max(T, 1)))
    few = len(maps) <= 4 if label_all is None else label_all
    image = None
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            ax = axes[r][c]
            image = ax.imshow(maps[(layer, head)], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"layer {layer}, head {head}", fontsize=10)
            ax.tick_params(length=0)
            # A big grid labels only its outer edges: every panel shares the same characters.
            if few or r == len(layers) - 1:
                ax.set_xticks(range(T), labels, fontsize=fontsize, rotation=90 if long_labels else 0)
                ax.set_xlabel("key (attended to)", fontsize=8)
            else:
                ax.set_xticks([])
            if few or c == 0:
                ax.set_yticks(range(T), labels, fontsize=fontsize)
                ax.set_ylabel("query", fontsize=8)
            else:
                ax.set_yticks([])
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    if title:
        fig.suptitle(title)
    return fig


class AttentionFrames:
    """The attention image of one probe text at evaluation after evaluation, each drawn in a fraction of the time.

    Only the weights and the step change from one evaluation to the next: the grid, the characters on its
    edges and the colour bar stay. Laying those out is most of the two seconds a figure of 20 heads takes,
    so the figure is drawn whole once, and each later frame repaints only the heatmaps (with the panels'
    frames over them) and the title, with the same pixels a whole new figure would have.
    """

    def __init__(self):
        self.key: tuple | None = None  # the characters and panels the drawn figure has
        self.figure: Any = None

    def image(self, chars: list[str], maps: dict[tuple[int, int], np.ndarray], title: str) -> np.ndarray:
        """The figure of `maps` as an RGB array (H, W, 3) of uint8, as figure_to_array(attention_figure(...))."""
        key = (tuple(chars), tuple(sorted(maps)))
        if key != self.key:
            self.figure, self.key = attention_figure(chars, maps, title=title, label_all=False), key
            return figure_to_array(self.figure)
        fig = self.figure
        renderer = fig.canvas.get_renderer()
        pixels = np.asarray(fig.canvas.buffer_rgba())
        heading = fig.texts[0]  # the title (fig.suptitle), the figure's only text of its own
        box = heading.get_window_extent(renderer)
        rows = slice(max(0, pixels.shape[0] - math.ceil(box.y1) - 1), pixels.shape[0] - math.floor(box.y0) + 1)
        pixels[rows, :, :] = (np.array(fig.get_facecolor()) * 255).round().astype(np.uint8)  # the old title gone
        heading.set_text(title)
        with _no_glyph_warnings():
            fig.draw_artist(heading)
            for ax in fig.axes:
                if ax.images and ax.get_title().startswith("layer "):
                    layer, head = (int(n) for n in ax.get_title().removeprefix("layer ").split(", head "))
                    ax.images[0].set_data(maps[(layer, head)])
                    ax.draw_artist(ax.patch)  # the panel's background first: the image's edge pixels blend with it
                    ax.draw_artist(ax.images[0])
                    for spine in ax.spines.values():
                        ax.draw_artist(spine)
        return pixels[:, :, :3].copy()


def surprise_figure(chars: list[str], bits: list[float], title: str = "") -> Any:
    """The text as a grid of cells coloured by the bits each character cost (the first is context)."""
    Figure, FigureCanvasAgg = _matplotlib()
    values = [math.nan] + list(bits)  # the first character is not scored
    rows = max(1, math.ceil(len(chars) / WRAP))
    cols = min(WRAP, len(chars))
    grid = np.full((rows, cols), np.nan)
    for i, v in enumerate(values):
        grid[i // cols, i % cols] = v
    fig = Figure(figsize=(0.22 * cols + 1.8, 0.32 * rows + 1.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(grid, cmap="Reds", vmin=0.0, vmax=MAX_BITS, aspect="auto", interpolation="nearest")
    fonts = plot_fonts(["monospace"])
    for i, ch in enumerate(chars):
        label = plot_label(ch, fonts)
        ax.text(i % cols, i // cols, label, ha="center", va="center", fontsize=8 if len(label) == 1 else 4,
                family="monospace")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(image, ax=ax, label="bits")
    heading = fig.suptitle(title or f"surprise, -log2 p(char | context): {sum(bits) / len(bits):.3f} bits/char "
                                    "(first character: context only)")
    needed = heading.get_window_extent(fig.canvas.get_renderer()).width / fig.dpi + 0.4  # inches, with margins
    fig.set_figwidth(max(fig.get_figwidth(), needed))  # a short text's grid is narrower than its title
    return fig


def loss_figure(curves: dict[str, list[tuple[int, float]]], title: str = "") -> Any:
    """Loss curves (step, value) of one run, one line per tag."""
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for tag, points in curves.items():
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=tag, marker="o" if len(points) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/char)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "loss")
    return fig


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write a figure as PNG (the parent directory is created)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise DataError(f"{path}: pictures are written as PNG; give a file name ending in .png")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _no_glyph_warnings():
            fig.savefig(path, dpi=100)
    except OSError as exc:
        raise DataError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


def figure_to_array(fig: Any) -> np.ndarray:
    """A drawn figure as an RGB image array (H, W, 3) of uint8, for TensorBoard."""
    with _no_glyph_warnings():
        fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[:, :, :3].copy()


def _colour(bits: float) -> str:
    """White for a sure character, deepening red up to MAX_BITS bits."""
    t = max(0.0, min(1.0, bits / MAX_BITS))
    fade = round(255 * (1.0 - 0.85 * t))
    return f"rgb(255,{fade},{fade})"


def surprise_html(chars: list[str], bits: list[float], title: str = "surprise") -> str:
    """A standalone HTML page: each character on a background as red as it was surprising."""
    spans = [f'<span class="ctx" title="context (not scored)">{_html_char(chars[0])}</span>']
    for ch, b in zip(chars[1:], bits):
        label = html.escape(f"{visible(ch)}: {b:.2f} bits", quote=True)
        spans.append(f'<span style="background:{_colour(b)}" title="{label}">{_html_char(ch)}</span>')
    mean = sum(bits) / len(bits)
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>" + html.escape(title) + "</title>\n"
        "<style>body{font-family:sans-serif} .text{font-family:monospace;white-space:pre-wrap;line-height:1.6}"
        " .ctx{color:#888} .nl{color:#bbb}</style></head><body>\n"
        f"<h3>{html.escape(title)}: {mean:.3f} bits/char over {len(bits)} characters</h3>\n"
        f"<p>Background: white = certain, red = {MAX_BITS:g}+ bits. Hover a character for its bits.</p>\n"
        "<div class=\"text\">" + "".join(spans) + "</div>\n</body></html>\n"
    )


def _html_char(ch: str) -> str:
    """A character for the HTML text: newlines shown as ↵ and then broken, the rest escaped."""
    if ch == "\n":
        return '<span class="nl">↵</span>\n'
    return html.escape(ch)


def write_text(path: str | Path, text: str) -> Path:
    """Write a UTF-8 text file (HTML), naming the path if it cannot be written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path


def read_scalars(run_dir: str | Path, tags: tuple[str, ...] = ("train/loss", "val/loss")) -> dict[str, list[tuple[int, float]]]:
    """Scalar series of a run from its TensorBoard event files, read with TensorBoard's own reader."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run directory {run_dir} does not exist; pass the directory a training run wrote to")
    if not any(run_dir.glob("events.out.tfevents.*")):
        raise DataError(f"{run_dir} holds no TensorBoard event files (events.out.tfevents.*); pass a run directory")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    found = acc.Tags().get("scalars", [])
    curves = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in tags if tag in found}
    if not curves:
        raise DataError(f"the event files in {run_dir} hold none of {', '.join(tags)}; has the run logged a step yet?")
    return curves
