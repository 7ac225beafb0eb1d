"""Pictures of what a trained network computes, for a run's report ("Inside the network"): the first convolution's
filters, the feature maps after each conv block, and the pixels that drove wrong answers (gradient saliency).

Any network with `input_shape` and `num_classes` works, not only ConvNet: its conv blocks are found by watching one
forward pass (forward hooks on its leaf modules), not by reading its layer names. Everything runs on a CPU copy of
the network in eval mode, so the network itself (its device, mode, hooks and gradients) is never touched, however a
figure fails.
"""

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import nn
from torchvision.utils import make_grid

from cnn_exp.plots import canvas, draw_image, literal, place

# Inches: a little narrower than an A4 page (8.3), so that a figure placed at a page's width keeps its 7–9 pt type
# at about that size.
WIDTH = 7.5

# A first convolution with more filters (a user's ResNet-like network has 64) shows its first 64: more would not fit.
MAX_FILTERS = 64

# Feature maps are enlarged (nearest neighbour, whole pixels) to at least this many pixels a side before they are put
# in a row, so that make_grid's 2-pixel gaps look the same between 3×3 maps and between 24×24 ones.
TILE = 24

# The outline drawn over a saliency map: where the image is brighter than this share of its range.
OUTLINE = 0.2

Labels = Sequence[int] | torch.Tensor


@dataclass
class _Call:
    """One call of a leaf module during a forward pass: its name, and its output where that is N×C×H×W."""

    name: str
    conv: bool
    output: torch.Tensor | None


def _cpu_copy(net: nn.Module) -> nn.Module:
    """The network on the CPU, in float32, in eval mode and without gradients for its weights: a copy, so that
    whatever happens here (hooks, mode, device) never reaches the network being trained or reported on. Hooks the
    network has come with it and run: they can be part of what it computes (weight_norm's is)."""
    net = copy.deepcopy(net).to("cpu", torch.float32).eval()
    net.requires_grad_(False)  # saliency needs gradients for the input only
    return net


def _cpu(images: torch.Tensor) -> torch.Tensor:
    return images.detach().to("cpu", torch.float32)


def _trace(net: nn.Module, images: torch.Tensor) -> list[_Call]:
    """Every leaf-module call of one forward pass of `images`, in order. Outputs are cloned: an in-place layer
    after (ReLU(inplace=True)) would otherwise change them."""
    calls: list[_Call] = []

    def hook(name: str, conv: bool) -> Callable[[nn.Module, object, object], None]:
        def record(module: nn.Module, inputs: object, output: object) -> None:
            four_d = isinstance(output, torch.Tensor) and output.dim() == 4
            calls.append(_Call(name, conv, output.detach().clone() if four_d else None))

        return record

    handles = []
    try:
        for name, module in net.named_modules():
            if next(module.children(), None) is None:  # a leaf: what the network is made of
                label = name or type(module).__name__  # a network that is one layer has no name for it
                handles.append(module.register_forward_hook(hook(label, isinstance(module, nn.Conv2d))))
        with torch.no_grad():
            net(images)
    finally:  # on a copy, but a hook left behind would still be a hook left behind
        for handle in handles:
            handle.remove()
    return calls


def _blocks(calls: list[_Call]) -> list[_Call]:
    """The end of each conv block: from each Conv2d call, the last call with an N×C×H×W output before the next Conv2d
    or before an output of another shape (flatten, global pooling, a linear layer).

    For ConvNet that is conv{i}_pool, or conv{i}_relu in a block without a pool. Where a network applies its
    activation as a function (F.relu), the block's last module is the convolution: its maps are before the ReLU.
    """
    blocks: list[_Call] = []
    current: _Call | None = None
    for call in calls:
        if call.conv:
            if current is not None:
                blocks.append(current)
            current = call if call.output is not None else None
        elif current is not None:
            if call.output is not None:
                current = call
            else:
                blocks.append(current)
                current = None
    if current is not None:
        blocks.append(current)
    return blocks


def conv_blocks(net: nn.Module) -> list[str]:
    """The modules whose outputs `feature_maps_figure` shows, one per conv block (found with one blank image of the
    network's `input_shape`)."""
    return [call.name for call in _blocks(_trace(_cpu_copy(net), torch.zeros(1, *net.input_shape)))]


def _first_conv(net: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The first Conv2d the network registers (for ConvNet and most networks, the first one its forward calls)."""
    return next(((name, m) for name, m in net.named_modules() if isinstance(m, nn.Conv2d)), None)


class _Page:
    """A figure laid out by hand, in inches from its top left corner: its layout is regular, and Matplotlib's
    constrained layout would take most of the drawing time to find the same positions."""

    def __init__(self, width: float, height: float, heading: list[str]) -> None:
        self.figure = Figure(figsize=(width, height))
        self.width, self.height = width, height
        self.figure.text(0.5, 1 - 0.06 / height, "\n".join(heading), ha="center", va="top", fontsize=9)

    def axes(self, left: float, top: float, width: float, height: float) -> Axes:
        ax = self.figure.add_axes(
            (left / self.width, 1 - (top + height) / self.height, width / self.width, height / self.height)
        )
        ax.set_xticks([])
        ax.set_yticks([])
        return ax


def _heading(title: str, *lines: str) -> list[str]:
    """The lines above a figure: the caller's title (which run), then what the figure shows."""
    return [literal(title, 120), *lines] if title else list(lines)


HEADING = 0.17  # inches per line of the 9-pt heading


def filters_figure(net: nn.Module, title: str = "") -> Figure | None:
    """The first convolution's filters, one small image each: what its output channels respond to in the input.
    None for a network without a Conv2d."""
    found = _first_conv(net)
    if found is None:
        return None
    name, conv = found
    weight = _cpu(conv.weight)
    out, inputs = weight.shape[:2]
    colour = inputs == 3
    # One panel per filter, or per (filter, input channel) for an input that is neither grey nor RGB: then a line
    # holds whole filters where their channels fit in 8 places.
    if inputs in (1, 3):
        shown = weight[:MAX_FILTERS]
        panels, columns = [(o, None) for o in range(len(shown))], min(8, len(shown))
    else:
        shown = weight[: max(1, MAX_FILTERS // inputs)]
        panels = [(o, i) for o in range(len(shown)) for i in range(inputs)]
        columns = min(len(panels), inputs * (8 // inputs) if inputs <= 8 else 8)
    rows = math.ceil(len(panels) / columns)
    side, gap, label = 0.7, 0.12, 0.18  # inches: a filter, the space between two, its label above it
    more = f"; the first {len(shown)} of {out}" if out > len(shown) else ""
    heading = _heading(
        title,
        f"First convolution {literal(name)}: weight {'×'.join(map(str, weight.shape))} (out × in × h × w){more}",
        "each filter scaled to its own range: the colours it weighs most"
        if colour
        else "each filter ÷ its own largest |weight|: red positive, blue negative, white 0",
    )
    top = HEADING * len(heading) + 0.15
    grid_width = columns * side + (columns - 1) * gap
    colorbar = 0 if colour else 0.6
    width = max(grid_width + colorbar + 0.3, 5.6)
    page = _Page(width, top + rows * (side + label) + 0.1, heading)
    left = (width - grid_width - colorbar) / 2
    image, ax = None, canvas(page.figure)
    for k, (o, i) in enumerate(panels):
        row, column = divmod(k, columns)
        box = (left + column * (side + gap), top + row * (side + label) + label, side)
        if colour:
            draw_image(ax, shown[o], box)
        else:
            kernel = shown[o, i if i is not None else 0]
            # Divided by its own largest |weight|, so that 0 stays white and the sign reads as a colour.
            scaled = kernel / kernel.abs().max().clamp(min=1e-12)
            image = place(ax, scaled.numpy(), box, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        title = f"#{o}" if i is None else f"#{o} in {i}"
        ax.text(box[0] + side / 2, box[1] - 0.03, title, ha="center", va="bottom", fontsize=8)
    if image is not None:
        bar = page.axes(left + grid_width + 0.2, top + label, 0.1, min(rows * (side + label) - label, 2.5))
        page.figure.colorbar(image, cax=bar, ticks=[-1, 0, 1])
        bar.set_yticklabels(["−max", "0", "+max"], fontsize=7)
    return page.figure


def feature_maps_figure(
    net: nn.Module,
    images: torch.Tensor,
    labels: Labels,
    classes: list[str],
    count: int = 3,
    channels: int = 8,
    title: str = "",
) -> Figure | None:
    """For each of the first `count` images, a band: the image, then for each conv block (`conv_blocks`) a row of
    its `channels` strongest feature maps for that image (highest mean activation first). None without a conv block
    or an image."""
    images = _cpu(images[:count])
    if len(images) == 0 or channels < 1:
        return None
    blocks = _blocks(_trace(_cpu_copy(net), images))
    if not blocks:
        return None
    labels = torch.as_tensor(labels)[: len(images)].tolist()
    columns = max(min(channels, call.output.shape[1]) for call in blocks)
    rows = [[_maps_row(call, n, channels, columns) for call in blocks] for n in range(len(images))]
    heading = _heading(
        title,
        f"Feature maps after each conv block: for each image the (up to) {columns} channels with the highest mean",
        "activation (under each map: its channel and that mean), strongest first; one colour scale per row",
    )
    # Inches: the input image on the left, the rows of maps beside it, each row a title, its maps and their labels.
    side, strip_left, title_height, label_height, gap = 1.0, 1.35, 0.2, 0.17, 0.08
    strip_width = WIDTH - strip_left - 0.1
    heights = [[strip_width * row.shape[0] / row.shape[1] for row, _, _ in band] for band in rows]
    bands = [max(sum(h + title_height + label_height + gap for h in band), side + 0.45) for band in heights]
    top = HEADING * len(heading) + 0.15
    page = _Page(WIDTH, top + sum(bands) + 0.15 * len(bands), heading)
    ax = canvas(page.figure)
    for n, band in enumerate(rows):
        if n:  # a line between two images' bands
            ax.add_line(Line2D([0.01 * WIDTH, 0.99 * WIDTH], [top - 0.08] * 2, color="0.75", linewidth=0.8))
        draw_image(ax, images[n], (0.15, top + title_height, side))
        ax.text(0.15 + side / 2, top + title_height - 0.03, "input", ha="center", va="bottom", fontsize=8)
        label = literal(classes[labels[n]], 20)
        ax.text(0.15 + side / 2, top + title_height + side + 0.03, label, ha="center", va="top", fontsize=8)
        y = top
        for call, (row, order, means), height in zip(blocks, band, heights[n], strict=True):
            _draw_row(ax, (strip_left, y + title_height, strip_width, height), call, row, order, means, columns)
            y += title_height + height + label_height + gap
        top += bands[n] + 0.15
    return page.figure


def _maps_row(call: _Call, n: int, channels: int, columns: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image `n`'s strongest `channels` maps of one block's output, enlarged and in one row of `columns` places
    (make_grid, gaps of NaN), with the channels shown and every channel's mean activation."""
    maps = call.output[n]
    means = maps.mean(dim=(1, 2))
    # Stable, so that equal means (channels that are all zero) keep channel order.
    order = torch.argsort(means, descending=True, stable=True)[:channels]
    height, width = maps.shape[1:]
    scale = max(1, math.ceil(TILE / max(height, width)))
    tiles = maps[order].repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)[:, None]
    # Places left over (a block with fewer channels than another) stay blank, so every row's maps are one size.
    blank = torch.full((columns - len(order), 1, *tiles.shape[2:]), math.nan)
    row = make_grid(torch.cat([tiles, blank]), nrow=columns, padding=2, pad_value=math.nan)[0]
    return row, order, means


def _draw_row(
    ax: Axes,
    box: tuple[float, float, float, float],
    call: _Call,
    row: torch.Tensor,
    order: torch.Tensor,
    means: torch.Tensor,
    columns: int,
) -> None:
    """One row of `_maps_row` in `box` of `ax` (left, top, width, height, y downwards), on one colour scale from its
    lowest to its highest value (the gaps are NaN: blank), titled with its block, each map labelled with its channel
    and mean activation."""
    left, top, width, height = box
    values = row[~row.isnan()]
    low, high = float(values.min()), float(values.max())
    ax.imshow(row.numpy(), cmap="magma", vmin=low, vmax=max(high, low + 1e-12), interpolation="nearest",
              extent=(left, left + width, top + height, top), aspect="auto")  # fmt: skip
    rows, cols = call.output.shape[2:]
    title = f"{literal(call.name)}: {call.output.shape[1]} channels of {rows}×{cols}"
    ax.text(left, top - 0.03, title, ha="left", va="bottom", fontsize=8)
    inches = width / row.shape[1]  # per pixel of the row
    step = (row.shape[1] - 2) / columns  # make_grid: a 2-pixel gap before each map and after the last
    for k, channel in enumerate(order.tolist()):
        text = f"ch {channel}: {float(means[channel]):.2f}"
        ax.text(left + (2 + (k + 0.5) * step - 1) * inches, top + height, text, ha="center", va="top", fontsize=7)


def gradient_saliency(net: nn.Module, images: torch.Tensor, targets: Labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain gradient saliency (Simonyan et al., 2014): |∂ score of `targets[i]` / ∂ pixel| of each image, its
    largest over the colour channels (N×H×W), and the network's probability for that class (N)."""
    net = _cpu_copy(net)
    inputs = _cpu(images).clone().requires_grad_(True)
    targets = torch.as_tensor(targets).to("cpu", torch.long)[:, None]
    scores = net(inputs)
    # Scores (logits) before softmax, as in the paper: each image's score depends on its own input only (eval
    # mode), so one backward of their sum gives every image's own gradient.
    (gradient,) = torch.autograd.grad(scores.gather(1, targets).sum(), inputs)
    probabilities = scores.detach().softmax(dim=1).gather(1, targets)[:, 0]
    return gradient.abs().amax(dim=1), probabilities


def saliency_figure(
    net: nn.Module,
    images: torch.Tensor,
    labels: Labels,
    predictions: Labels,
    classes: list[str],
    count: int = 6,
    title: str = "",
) -> Figure | None:
    """Misclassified images (the caller's), each beside its gradient saliency for the predicted class: the pixels
    whose change would move that wrong answer most. None without an image."""
    images = _cpu(images[:count])
    if len(images) == 0:
        return None
    labels = torch.as_tensor(labels)[: len(images)].tolist()
    predictions = torch.as_tensor(predictions)[: len(images)].tolist()
    maps, probabilities = gradient_saliency(net, images, predictions)
    heading = _heading(
        title,
        "Plain gradient saliency of wrong answers (true → predicted, p: the predicted class's probability):",
        "|∂ score of the predicted class / ∂ pixel|, largest over colour channels, each map on its own scale;",
        "brighter: the wrong score is more sensitive to that pixel (outline: where the image is not dark)",
    )
    pairs = min(3, len(images))  # per line: three image–saliency pairs fit A4's width
    lines = math.ceil(len(images) / pairs)
    # Inches: a pair is two squares of `side` 0.04 apart, pairs 0.3 apart; a caption above each pair.
    gap, between, caption = 0.04, 0.3, 0.24
    side = (WIDTH - 0.2 - 2 * between - 3 * gap) / 6  # as large as three pairs allow, with fewer pairs too
    top = HEADING * len(heading) + 0.15
    page = _Page(WIDTH, top + lines * (caption + side + 0.1), heading)
    left = (WIDTH - pairs * (2 * side + gap) - (pairs - 1) * between) / 2
    ax = canvas(page.figure)
    for k, (image, saliency) in enumerate(zip(images, maps, strict=True)):
        line, column = divmod(k, pairs)
        x, y = left + column * (2 * side + gap + between), top + line * (caption + side + 0.1) + caption
        draw_image(ax, image, (x, y, side))
        names = f"{literal(classes[labels[k]], 14)} → {literal(classes[predictions[k]], 14)}"
        ax.text(x, y - 0.04, f"{names} (p={float(probabilities[k]):.2f})", ha="left", va="bottom", fontsize=8)
        vmax = max(float(saliency.max()), 1e-12)
        shown = place(ax, saliency.numpy(), (x + side + gap, y, side), cmap="inferno", vmin=0, vmax=vmax)
        # The image's outline over its saliency, so the bright spots can be placed on the strokes. At a fifth of its
        # range: around a garment's silhouette rather than around each stripe of its texture (as at half would).
        # Solid even below 0 (a normalized image's dark half), where Matplotlib would dash it. Drawn at the pixels'
        # centres where the saliency map landed.
        grey = image.mean(dim=0)
        if grey.max() > grey.min():
            level = float(grey.min() + OUTLINE * (grey.max() - grey.min()))
            x0, x1, y1, y0 = shown.get_extent()  # y downwards: its bottom is y1
            xs = x0 + (torch.arange(grey.shape[1]) + 0.5).numpy() * (x1 - x0) / grey.shape[1]
            ys = y0 + (torch.arange(grey.shape[0]) + 0.5).numpy() * (y1 - y0) / grey.shape[0]
            ax.contour(xs, ys, grey.numpy(), levels=[level], colors="cyan", linewidths=0.6, alpha=0.7,
                       linestyles="solid")  # fmt: skip
    return page.figure
