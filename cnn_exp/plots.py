"""The figures a person looks at: confusion matrices, labelled image grids, a run's curves, a sweep's results.

TensorBoard shows an image shrunk to its card (about 400 pixels wide), so the figures meant for it are drawn about
that size with large type: one matrix or one narrow grid per image, not several side by side.

A figure is drawn once (`pixels`) and those pixels are both written as a PNG and sent to TensorBoard: laying out
and drawing text is most of a small run's time, and Matplotlib's savefig and TensorBoard's add_figure draw again.
"""

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle
from PIL import Image

from cnn_exp import atomic
from cnn_exp.errors import shown

LINESPACING = 1.2  # a caption's lines apart, in multiples of its font's size
SIDE, MAX_SIDE = 3.0, 12.0  # inches: a confusion matrix's side, at least and at most
# What a confusion figure can show: images per (true, predicted) pair, or each row's share of its true class.
KINDS = ("counts", "rates")


def pixels(figure: Figure) -> np.ndarray:
    """The figure drawn once at its own size (100 dpi): height x width x RGB."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def literal(text: object, limit: int = 40) -> str:
    """Text read from a file (a class name, a file name) as Matplotlib draws it, character for character: one line
    with its control characters escaped (`shown`; a glyph Matplotlib lacks would also be named, raw, in a warning),
    at most `limit` characters (a figure has no room for more), and each `$` escaped, which would otherwise start a
    formula: `$x$` drawn in italics, an odd number of `$` or a formula Matplotlib cannot parse failing the figure."""
    return shown(text, limit).replace("$", r"\$")


def side_by_side(*images: np.ndarray) -> np.ndarray:
    """Drawn figures as one image, left to right, the shorter ones padded with white below."""
    height = max(image.shape[0] for image in images)
    padded = [np.pad(image, ((0, height - image.shape[0]), (0, 0), (0, 0)), constant_values=255) for image in images]
    return np.concatenate(padded, axis=1)


def write_png(image: np.ndarray, path: str | Path) -> None:
    """Replaced whole (cnn_exp/atomic.py): a viewer refreshing the file never catches half of it."""
    with atomic.replace(path, "wb") as f:
        Image.fromarray(image).save(f, format="PNG")


def confusion_figure(
    matrix: torch.Tensor, classes: list[str], title: str, kinds: Sequence[str] = KINDS, heading: str = ""
) -> Figure:
    """One panel per kind side by side, each with the class names on its axes and a colour scale; `heading` above
    them (which run, what accuracy). Laid out by hand around a square matrix, SIDE inches or a row's height per class
    (up to MAX_SIDE), from the measured sizes of its labels, the figure as large as they need: Matplotlib's
    constrained layout, which finds margins by drawing the labels again and again within a figure of fixed size,
    took half its time (and squeezed the matrix of long class names until they overlapped)."""
    figure = Figure()
    size = _text_size(figure)
    names, heading = [literal(name) for name in classes], literal(heading, 200)
    long = max(map(len, names)) > 2
    label_width, line = max(size(name, 9)[0] for name in names), size("Ag", 9)[1]
    side = min(max(SIDE, 1.3 * line * len(names)), MAX_SIDE)
    tick = 0.1  # inches from an axis to its tick labels: the tick (3.5 points) and its pad
    # Rotated 45°, a label reaches below its tick by its width and height times cos 45°.
    below = (label_width + line) * math.sqrt(0.5) if long else line
    top = (0.06 + line + 0.04 if heading else 0.05) + 1.3 * line + 0.1  # the heading, the panel's title and a gap
    bottom = tick + below + 0.06 + line + 0.1  # tick labels, then "predicted class"
    left = 0.08 + line + 0.06 + label_width + tick  # "true class", then the tick labels
    numbers = size(str(max(int(matrix.max()), 100)), 8)[0]  # the colour scale's longest: counts, or 100 %
    scale = 0.15 + 0.12 + tick + numbers + 0.06 + line + 0.1  # the colour scale, its numbers and label
    panel = left + side + scale
    width, height = max(panel * len(kinds), size(heading, 9)[0] + 0.2 if heading else 0), top + side + bottom
    figure.set_size_inches(width, height)
    if heading:
        figure.text(0.5, 1 - 0.06 / height, heading, ha="center", va="top", fontsize=9)
    for i, kind in enumerate(kinds):
        x = (width - panel * len(kinds)) / 2 + panel * i + left  # panels centred under a wider heading
        ax = figure.add_axes((x / width, bottom / height, side / width, side / height))
        colorbar = figure.add_axes(((x + side + 0.15) / width, (bottom + 0.1 * side) / height, 0.12 / width,
                                    0.8 * side / height))  # fmt: skip
        _confusion_panel(figure, ax, colorbar, matrix.cpu().double(), names, kind, long)
        ax.set_title(f"{title}: {'% of each true class' if kind == 'rates' else 'images'}", fontsize=10)
    return figure


def _text_size(figure: Figure) -> Callable[[str, float], tuple[float, float]]:
    """A function (text, points) -> its (width, height) in inches, as `figure`'s Agg renderer draws it."""
    renderer, dpi = FigureCanvasAgg(figure).get_renderer(), figure.dpi

    def size(text: str, points: float) -> tuple[float, float]:
        width, height, _ = renderer.get_text_width_height_descent(text, FontProperties(size=points), ismath=False)
        return width / dpi, height / dpi

    return size


def _confusion_panel(
    figure: Figure, ax: Axes, bar: Axes, matrix: torch.Tensor, names: list[str], kind: str, long: bool
) -> None:
    rates = kind == "rates"
    values = 100 * matrix / matrix.sum(dim=1, keepdim=True).clamp(min=1) if rates else matrix
    image = ax.imshow(values.numpy(), cmap="Blues", vmin=0, vmax=100 if rates else max(float(values.max()), 1))
    colorbar = figure.colorbar(image, cax=bar)
    colorbar.set_label("% of the true class" if rates else "images", fontsize=9)
    colorbar.ax.tick_params(labelsize=8)
    # Empty cells stay blank, so the mistakes stand out; a rate that rounds to 0 % reads "<1".
    dark = 0.55 * float(image.norm.vmax)
    size = 8 if len(names) <= 10 else 6
    for (true, predicted), value in zip(
        torch.cartesian_prod(*[torch.arange(len(names))] * 2).tolist(), values.flatten().tolist(), strict=True
    ):
        if matrix[true, predicted] == 0:
            continue
        # Half up (format's round-half-to-even would print 0.5 % as "0" in a cell that is not empty).
        text = "<1" if rates and value < 0.5 else str(math.floor(value + 0.5))
        color = "white" if value > dark else "black"
        ax.text(predicted, true, text, ha="center", va="center", fontsize=size, color=color)
    ticks = range(len(names))
    ax.set_xticks(
        ticks, names, fontsize=9, rotation=45 if long else 0, ha="right" if long else "center", rotation_mode="anchor"
    )
    ax.set_yticks(ticks, names, fontsize=9)
    ax.set_xlabel("predicted class", fontsize=9)
    ax.set_ylabel("true class", fontsize=9)


def image_grid(
    images: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor, classes: list[str], title: str
) -> Figure:
    """Images with their class under each; a wrong prediction in red, as `true → predicted`. The title's lines are
    drawn as text (`literal`): they name the run, and with it the user's data folder."""
    names = [literal(name, 14) for name in classes]  # what fits under a 1-inch image, in type made smaller if need be
    pairs = list(zip(labels.tolist(), predictions.tolist(), strict=True))
    captions = [names[true] if true == guess else f"{names[true]}\n→ {names[guess]}" for true, guess in pairs]
    size = 11 if max(map(len, names)) <= 2 else 9  # digits can be larger than Fashion-MNIST's names
    colors = ["black" if true == guess else "red" for true, guess in pairs]
    title = "\n".join(literal(line, 200) for line in title.split("\n"))
    return labelled_grid(list(images.cpu()), captions, title, columns=4, fontsize=size, colors=colors)


def labelled_grid(
    images: Sequence[torch.Tensor],
    captions: Sequence[str],
    title: str,
    columns: int,
    *,
    side: float = 0.9,
    cell: float = 1.05,
    fontsize: float = 9,
    colors: Sequence[str] | None = None,
    values_0_to_1: bool = False,
) -> Figure:
    """Images in squares of `side` inches, `columns` to a line in cells `cell` inches wide, each with its caption (up
    to two lines, in smaller type where it would not fit its cell) below and `title` (drawn as given) above; the figure
    as wide as the title needs. Laid out by hand on one axes whose units are inches from the top left: an axes per
    image, laid out by Matplotlib, took most of a test report's drawing time."""
    columns = max(1, min(columns, len(images)))
    rows = max(1, math.ceil(len(images) / columns))
    figure = Figure()
    size = _text_size(figure)
    lines = [size(line or " ", 9) for line in title.split("\n")]
    title_width, head = max(w for w, _ in lines), 0.05 + LINESPACING * sum(h for _, h in lines) + 0.1
    caption = 2 * LINESPACING * fontsize / 72 + 0.1  # two lines of `fontsize` points and the space above them
    width, height = max(cell * columns, title_width + 0.2), head + rows * (side + caption + 0.05)
    margin = (width - cell * columns) / 2  # the images centred under a wider title
    figure.set_size_inches(width, height)
    figure.text(0.5, 1 - 0.05 / height, title, ha="center", va="top", fontsize=9)
    ax = canvas(figure)
    for i, (image, text) in enumerate(zip(images, captions, strict=True)):
        row, column = divmod(i, columns)
        left, top = margin + column * cell + (cell - side) / 2, head + row * (side + caption + 0.05)
        draw_image(ax, image, (left, top, side), values_0_to_1)
        color = colors[i] if colors else "black"
        # Smaller where its longest line would reach into the next cell (a long class or file name), down to 5 points.
        longest = max(size(line or " ", fontsize)[0] for line in text.split("\n"))
        points = max(5.0, fontsize * min(1.0, (cell - 0.08) / longest))
        ax.text(left + side / 2, top + side + 0.06, text, ha="center", va="top", fontsize=points, color=color,
                linespacing=LINESPACING)  # fmt: skip
    return figure


def canvas(figure: Figure) -> Axes:
    """One axes over the whole figure, in inches from its top left, without ticks or frame: images placed on it
    (`place`) draw far faster than an axes each."""
    width, height = figure.get_size_inches()
    ax = figure.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    return ax


def draw_image(
    ax: Axes, image: torch.Tensor, box: tuple[float, float, float], values_0_to_1: bool = False
) -> AxesImage:
    """One C×H×W image (or H×W), grey or colour, fitted into the square `box` of `ax` (`place`). Normalized values
    (`values_0_to_1` false) are stretched to the image's own range, as matplotlib stretches a grey one."""
    image = image.detach().float().cpu()
    image = image[None] if image.dim() == 2 else image
    if not values_0_to_1:
        low, high = image.min(), image.max()
        image = (image - low) / (high - low).clamp(min=1e-12)
    if image.shape[0] == 1:
        return place(ax, image[0].numpy(), box, cmap="gray", vmin=0, vmax=1)
    return place(ax, image.permute(1, 2, 0).clamp(0, 1).numpy(), box)


def place(ax: Axes, values: np.ndarray, box: tuple[float, float, float], **imshow: Any) -> AxesImage:
    """`values` (rows × columns, or × RGB) drawn as an image fitted into the square `box` of `ax` (left, top, side in
    its units, y downwards), centred, its shape kept, and framed: many images on one axes draw far faster than an
    axes each. Its extent (`get_extent()`) says where it landed."""
    left, top, side = box
    rows, columns = values.shape[:2]
    scale = side / max(rows, columns)
    width, height = columns * scale, rows * scale
    left, top = left + (side - width) / 2, top + (side - height) / 2
    image = ax.imshow(values, extent=(left, left + width, top + height, top), aspect="auto", **imshow)
    ax.add_patch(Rectangle((left, top), width, height, fill=False, edgecolor="black", linewidth=0.8))
    return image


def curves_figure(rows: list[dict[str, Any]], title: str, test: float | None = None) -> Figure:
    """Loss and accuracy against epoch, train and validation, from a run's epochs.csv rows; the test accuracy, when
    the run was tested, a dotted line on the accuracy panel."""
    figure = Figure(figsize=(10, 4), layout="constrained")
    figure.suptitle(title, fontsize=11)
    epochs = [row["epoch"] for row in rows]
    for i, metric in enumerate(("loss", "acc"), start=1):
        ax = figure.add_subplot(1, 2, i)
        for split, style in (("train", "o-"), ("val", "s--")):
            points = [
                (e, row[f"{split}/{metric}"])
                for e, row in zip(epochs, rows, strict=True)
                if row.get(f"{split}/{metric}") is not None
            ]
            if points:
                ax.plot(*zip(*points, strict=True), style, label=split)
        if metric == "acc" and test is not None:
            ax.axhline(test, color="tab:green", linestyle=":", label=f"test {test:.4f}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if metric == "acc" else "cross-entropy loss")
        if epochs:  # from epoch 0, so that a short run is a line on an axis of epochs, not dots in a 0.08-wide one
            ax.set_xlim(0, max(epochs) + 0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend()
    return figure


def sweep_figure(values: dict[str, list[Any]], scores: list[float], metric: str, title: str) -> Figure:
    """The metric against each swept key: a heatmap for two keys, else one panel per key (each job a dot, the
    mean of jobs with the same value a line). Jobs that share a cell or value (other seeds) are averaged.

    `values` maps each key to one value per job, in the order of `scores`.
    """
    keys = list(values)
    levels = {key: _ordered(values[key]) for key in keys}
    if len(keys) == 2:
        rows, columns = levels[keys[0]], levels[keys[1]]
        cells: dict[tuple[int, int], list[float]] = {}
        for row, column, score in zip(values[keys[0]], values[keys[1]], scores, strict=True):
            cells.setdefault((rows.index(row), columns.index(column)), []).append(score)
        grid = torch.full((len(rows), len(columns)), math.nan, dtype=torch.float64)
        for (r, c), cell in cells.items():
            grid[r, c] = sum(cell) / len(cell)
        figure = Figure(figsize=(3.2 + 1.4 * len(columns), 2.4 + 0.9 * len(rows)), layout="constrained")
        ax = figure.add_subplot()
        image = ax.imshow(grid.numpy(), cmap="viridis", aspect="auto")
        figure.colorbar(image, ax=ax).set_label(metric)
        low, high = image.norm.vmin, image.norm.vmax
        for (r, c), cell in cells.items():
            mean = sum(cell) / len(cell)
            light = high == low or (mean - low) / (high - low) > 0.6
            text = f"{mean:.4f}" + (f"\n{len(cell)} jobs" if len(cell) > 1 else "")
            ax.text(c, r, text, ha="center", va="center", fontsize=9, color="black" if light else "white")
        ax.set_xticks(range(len(columns)), map(str, columns))
        ax.set_yticks(range(len(rows)), map(str, rows))
        ax.set_xlabel(keys[1])
        ax.set_ylabel(keys[0])
    else:
        figure = Figure(figsize=(4.2 * len(keys), 3.6), layout="constrained")
        for i, key in enumerate(keys, start=1):
            ax = figure.add_subplot(1, len(keys), i)
            ordered = levels[key]
            positions = [ordered.index(value) for value in values[key]]
            ax.plot(positions, scores, "o", alpha=0.5, label="a job")
            means = [
                sum(s for p, s in zip(positions, scores, strict=True) if p == level) / positions.count(level)
                for level in range(len(ordered))
            ]
            ax.plot(range(len(ordered)), means, "-", color="black", label="mean")
            ax.set_xticks(range(len(ordered)), map(str, ordered))
            ax.set_xlabel(key)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
        figure.axes[0].legend()
    figure.suptitle(title, fontsize=10)
    return figure


def _ordered(values: list[Any]) -> list[Any]:
    """Distinct values, numbers in numeric order, anything else as text."""
    distinct = list(dict.fromkeys(values))
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in distinct):
        return sorted(distinct)
    return sorted(distinct, key=str)
