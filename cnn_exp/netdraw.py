"""The network drawn from the module itself, and the arithmetic behind each feature map's size: what the lab report
asks for (each layer's weight shape, its output shape for one image, and why fc1 takes 192 values, 96 for Network3).

Both pass one blank image through the network with a forward hook on every leaf module, as the layer table does
(cnn_exp/layers.py), so they show what the code computes, for any settings or a model of one's own, and never what
the notebook's networks alone would. Each size formula is checked against the shape the hooks measured.
"""

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle
from matplotlib.path import Path
from torch import nn

from cnn_exp.errors import shown
from cnn_exp.plots import literal

Shape = tuple[int, ...]

# Leaf types that keep the shape and have no weight matrix worth a node of their own: they are named on the arrow
# into the node before them ("conv 5×5, ReLU"), as the notebook's drawing would.
_ON_ARROW = {
    "torch.nn.modules.activation",
    "torch.nn.modules.batchnorm",
    "torch.nn.modules.dropout",
    "torch.nn.modules.instancenorm",
    "torch.nn.modules.normalization",
}
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)  # those with a size formula; an adaptive pool's size is its setting
_ADAPTIVE = (nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)


def _shape(shape: Shape | None) -> str:
    return "?" if shape is None else "×".join(map(str, shape))


@dataclass(frozen=True)
class _Step:
    """One call of a leaf module: its shapes for one image (no batch dimension), and `apart` when its input is not
    the previous step's output: forward() computed something in between (a functional ReLU, a residual addition)."""

    name: str
    module: nn.Module
    input: Shape | None
    output: Shape | None
    apart: bool


@dataclass
class _Trace:
    input: Shape | None
    steps: list[_Step] = field(default_factory=list)
    output: Shape | None = None  # the model's own output, when it is not the last step's (None otherwise)
    error: str = ""  # why no image went through (no input_shape, forward() raised), as it came: what was seen is kept


def _first_tensor(value: object) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, list | tuple) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


@torch.no_grad()
def _trace(net: nn.Module) -> _Trace:
    """One blank image of `net.input_shape` through `net` on the CPU in eval mode, each leaf's call recorded."""
    input_shape = getattr(net, "input_shape", None)
    if input_shape is None:
        return _Trace(None, error=f"{type(net).__name__} has no input_shape (C, H, W of one image)")
    trace = _Trace(tuple(int(v) for v in input_shape))
    parameters = list(net.parameters())
    if any(p.device.type != "cpu" for p in parameters):
        net = copy.deepcopy(net).cpu()  # a copy: the caller's model stays where it is
    floating = [p.dtype for p in parameters if p.is_floating_point()]
    image = torch.zeros(1, *trace.input, dtype=floating[0] if floating else torch.float32)
    last: list[torch.Tensor | None] = [image]  # what the previous leaf returned, to tell what forward() did apart

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: object) -> None:
            given, made = _first_tensor(args), _first_tensor(output)
            trace.steps.append(
                _Step(
                    name,
                    module,
                    None if given is None else tuple(given.shape[1:]),
                    None if made is None else tuple(made.shape[1:]),
                    apart=given is not last[0],
                )
            )
            last[0] = made

        return record

    # Each module's own flag, not net.train(mode) afterwards: a model may keep some layers in eval mode on purpose.
    modes = {module: module.training for module in net.modules()}
    leaves = [(name, m) for name, m in net.named_modules() if name and next(m.children(), None) is None]
    handles = [module.register_forward_hook(hook(name)) for name, module in leaves]
    net.eval()
    try:
        out = _first_tensor(net(image))
        if out is not None and out is not last[0]:
            trace.output = tuple(out.shape[1:])
    except Exception as err:  # a model of one's own may fail on a blank image: draw and say what was seen
        first = str(err).splitlines()[0] if str(err) else ""
        trace.error = f"forward() failed on one blank {_shape(trace.input)} image: {type(err).__name__}: {first}"
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    return trace


def _on_arrow(step: _Step) -> bool:
    """Whether `step` is a shape-keeping helper (activation, norm, dropout) named on an arrow, not drawn as a node."""
    module = step.module
    return step.input == step.output and (isinstance(module, nn.Identity) or type(module).__module__ in _ON_ARROW)


# The size arithmetic ------------------------------------------------------------------------------------------------


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _axis(size: int, kernel: int, stride: int, padding: int, dilation: int, pool: bool, ceil: bool) -> tuple[str, int]:
    """PyTorch's output size along one axis, ⌊(size + 2×padding − dilation×(kernel − 1) − 1) / stride⌋ + 1, written
    with the numbers: as the lab writes it where it can ((28 + 2×0 − 5) / 1 + 1 for a conv, ⌊24 / 2⌋ for a 2×2 pool)."""
    if pool and kernel == stride and padding == 0 and dilation == 1 and not ceil:
        out, dropped = divmod(size, kernel)
        return f"⌊{size} / {kernel}⌋ = {out}" + (f" (remainder {dropped} dropped)" if dropped else ""), out
    span = f"{kernel}" if dilation == 1 else f"{dilation}×({kernel} − 1) − 1"
    reach = size + 2 * padding - dilation * (kernel - 1) - 1
    expr = f"({size} + 2×{padding} − {span}) / {stride}"
    if ceil:
        # PyTorch's rule for ceil_mode: the last window must start inside the image or its left padding.
        out = -(-reach // stride) + 1
        out -= (out - 1) * stride >= size + padding
        return f"⌈{expr}⌉ + 1 = {out}", out
    out, dropped = divmod(reach, stride)
    out += 1
    if pool or dropped:  # a conv whose stride divides evenly needs no rounding: the lab's own formula
        return f"⌊{expr}⌋ + 1 = {out}" + (f" (remainder {dropped} dropped)" if dropped else ""), out
    return f"{expr} + 1 = {out}", out


def _formula(step: _Step) -> tuple[str, Shape] | None:
    """The size formula of a Conv2d, MaxPool2d or AvgPool2d with its numbers, and the shape it gives; None for any
    other layer, or one whose settings it cannot follow."""
    module, given = step.module, step.input
    if not isinstance(module, (nn.Conv2d, *_POOLS)) or given is None or len(given) != 3:
        return None
    channels, *sizes = given
    if isinstance(module, nn.Conv2d):
        channels, pool, ceil = module.out_channels, False, False
        if module.padding == "same":
            return f"padding 'same' keeps {_shape(sizes)}", (channels, *sizes)
        padding = (0, 0) if module.padding == "valid" else _pair(module.padding)
    else:
        pool, ceil, padding = True, bool(module.ceil_mode), _pair(module.padding)
    dilation = _pair(getattr(module, "dilation", 1))  # AvgPool2d has none
    settings = zip(sizes, _pair(module.kernel_size), _pair(module.stride), padding, dilation, strict=True)
    (height, h), (width, w) = (_axis(*axis, pool=pool, ceil=ceil) for axis in settings)
    text = height if height == width else f"height {height}, width {width}"
    return text, (channels, h, w)


def _source(steps: list[_Step], index: int) -> str:
    """The layer whose output reaches steps[index] (a flatten), past the shape-keeping helpers in between."""
    while index > 0 and _on_arrow(steps[index - 1]):
        index -= 1
    return steps[index - 1].name if index > 0 else "the input image"


def _fc_sentence(trace: _Trace) -> str | None:
    """Why the first Linear layer takes the number of inputs it does, or why that cannot be computed here."""
    steps = trace.steps
    first = next((i for i, step in enumerate(steps) if isinstance(step.module, nn.Linear)), None)
    if first is None:
        return None
    linear = steps[first]
    takes = linear.module.in_features
    before = steps[first - 1].output if first else trace.input
    flat = steps[first - 1] if first else None
    if linear.apart and linear.input != before:
        came = f"{steps[first - 1].name}'s {_shape(before)}" if first else f"the {_shape(before)} image"
        return (
            f"{linear.name} takes {takes} values, which forward() makes from {came} outside its layers "
            f"(a call that is not a layer): that step cannot be computed here; measured: {takes}"
        )
    if (
        flat is not None
        and not flat.apart
        and flat.input is not None
        and len(flat.input) > 1
        and flat.output == (math.prod(flat.input),)
        and math.prod(flat.input) == takes
    ):
        product = " × ".join(map(str, flat.input))
        return f"{_source(steps, first - 1)} gives {product} = {takes} values, so {linear.name} takes {takes}"
    return f"{linear.name} takes {takes} values; measured: its input is {_shape(linear.input)}"


def size_arithmetic(net: nn.Module) -> list[str]:
    """Each Conv2d's and pool's output size worked out with its own numbers, in call order, then why fc1 takes the
    inputs it does ("conv2_pool gives 12 × 4 × 4 = 192 values, so fc1 takes 192"): lines for the lab report.

    Each size is checked against the shape measured on one blank image; a layer without a formula here (an adaptive
    pool, a layer of one's own) or a shape forward() changes outside its layers is given as measured.
    """
    trace = _trace(net)
    lines = []
    previous, previous_name = trace.input, "the input image"
    for step in trace.steps:
        is_linear = isinstance(step.module, nn.Linear)
        if step.apart and step.input != previous and not is_linear:  # the first Linear's sentence says this itself
            lines.append(
                f"{step.name}: its input {_shape(step.input)} is not {previous_name}'s {_shape(previous)}: forward() "
                "changes the shape outside its layers, which cannot be computed here"
            )
        formula = _formula(step)
        if formula is not None and formula[1] == step.output:
            lines.append(f"{step.name}: {formula[0]} → {_shape(step.output)}")
        elif formula is not None:  # a subclass that pads or strides in its own way: never print a wrong size
            lines.append(
                f"{step.name}: measured: {_shape(step.output)} (its settings' formula would give {_shape(formula[1])})"
            )
        elif isinstance(step.module, (nn.Conv2d, *_POOLS)) or (
            step.input != step.output and not is_linear and not isinstance(step.module, nn.Flatten)
        ):
            lines.append(f"{step.name} ({type(step.module).__name__}): measured: {_shape(step.output)}")
        previous, previous_name = step.output, step.name
    sentence = _fc_sentence(trace)
    if sentence:
        lines.append(sentence)
    if trace.error:
        lines.append(trace.error)
    elif not trace.steps:
        lines.append(f"{type(net).__name__} called no layer: there is nothing to compute")
    return [shown(line, 500) for line in lines]  # one printable line each, whatever a model's names hold


# The figure ---------------------------------------------------------------------------------------------------------

# Drawn at the width of an A4 page's text (17 cm), so the type prints at its own size: 7.5 pt, at least 7.
WIDTH, MARGIN = 6.7, 0.1  # inches
DPI = 200  # `plots.pixels` draws it 1340 pixels wide: sharp in print, where 100 dpi would blur 7.5-point type
FONT = 7.5
LINE = FONT * 1.3 / 72  # one line of text, inches
STUB = 0.16  # the turn of the arrow from one row to the next
DEPTH = 0.045  # offset between the stacked rectangles of a feature map
ROW_GAP = 0.2
GREY = "#555555"
FILLS = {"input": "#e4e4e4", "conv": "#cfe2f3", "pool": "#d5ecd0", "linear": "#f8dcbc", "flatten": "#e4e4e4"}


@dataclass
class _Node:
    """One drawn tensor: the image, a stack of feature maps, a vector as a bar, or a box for a layer of another
    kind; its shape is written under it."""

    kind: str  # "maps", "bar" or "box"
    shape: Shape | None
    fill: str
    inside: str = ""  # a box's layer type
    dashed: bool = False  # made by forward() outside its layers
    size: tuple[float, float] = (0.0, 0.0)  # drawing width, height (inches), set by _measure
    stacked: int = 1  # rectangles in a stack of maps
    width: float = 0.0  # with its label


@dataclass
class _Edge:
    """The arrow into a node: the layer's name and weight shape over it, what it does under it."""

    name: str = ""
    weight: str = ""
    ops: list[str] = field(default_factory=list)
    dashed: bool = False
    lines: list[str] = field(default_factory=list)  # ops wrapped to fit, set by _measure
    width: float = 0.0


def _size(value: int | Sequence[int]) -> str:
    a, b = _pair(value)
    return f"{a}" if a == b else f"{a}×{b}"


def _ops(module: nn.Module) -> list[str]:
    """What a layer does, in the words of the lab ("conv 5×5", "max-pool 2×2"), one part per setting."""
    if isinstance(module, nn.Conv2d):
        kh, kw = _pair(module.kernel_size)
        parts = [f"conv {kh}×{kw}"]
        if _pair(module.stride) != (1, 1):
            parts.append(f"stride {_size(module.stride)}")
        if isinstance(module.padding, str):
            parts.append(f"pad {module.padding}")
        elif _pair(module.padding) != (0, 0):
            parts.append(f"pad {_size(module.padding)}")
        if _pair(module.dilation) != (1, 1):
            parts.append(f"dilation {_size(module.dilation)}")
        if module.groups != 1:
            parts.append(f"groups {module.groups}")
        return parts
    if isinstance(module, _POOLS):
        kh, kw = _pair(module.kernel_size)
        parts = [f"{'max' if isinstance(module, nn.MaxPool2d) else 'avg'}-pool {kh}×{kw}"]
        if _pair(module.stride) != (kh, kw):
            parts.append(f"stride {_size(module.stride)}")
        if _pair(module.padding) != (0, 0):
            parts.append(f"pad {_size(module.padding)}")
        return parts
    if isinstance(module, _ADAPTIVE):
        return [f"adaptive {'max' if isinstance(module, nn.AdaptiveMaxPool2d) else 'avg'}-pool"]
    if isinstance(module, nn.Linear):
        return ["linear"]
    if isinstance(module, nn.Flatten):
        return ["flatten"]
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return ["batch norm"]
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return [f"dropout {module.p:g}"]
    if isinstance(module, nn.Identity):
        return []
    return [literal(type(module).__name__, 24)]


def _node(step: _Step) -> _Node:
    module, shape = step.module, step.output
    rank = None if shape is None else len(shape)
    if isinstance(module, nn.Conv2d) and rank == 3:
        return _Node("maps", shape, FILLS["conv"])
    if isinstance(module, (*_POOLS, *_ADAPTIVE)) and rank == 3:
        return _Node("maps", shape, FILLS["pool"])
    if isinstance(module, nn.Linear | nn.Flatten) and rank == 1:
        return _Node("bar", shape, FILLS["linear" if isinstance(module, nn.Linear) else "flatten"])
    return _Node("box", shape, "#fff3b8", inside=literal(type(module).__name__, 24))


def _apart(shape: Shape | None) -> _Node:
    """A tensor forward() makes outside its layers, drawn by its rank, dashed."""
    rank = None if shape is None else len(shape)
    kind = "maps" if rank == 3 else "bar" if rank == 1 else "box"
    return _Node(kind, shape, "white", inside="in forward()" if kind == "box" else "", dashed=True)


def _diagram(trace: _Trace) -> tuple[list[_Node], list[_Edge]]:
    """The nodes to draw (the image, then each layer's output that is not a shape-keeping helper's) and the arrows
    between them; edges[i] leads into nodes[i + 1]."""
    assert trace.input is not None
    image = _apart(trace.input)
    image.fill, image.dashed, image.inside = FILLS["input"], False, "input" if image.kind == "box" else ""
    nodes, edges = [image], []
    shape = trace.input
    for step in trace.steps:
        if step.apart and step.input != shape:  # forward() made a tensor of another shape: draw it, dashed
            nodes.append(_apart(step.input))
            edges.append(_Edge(ops=["in forward()"], dashed=True))
        outside = ["forward() ops"] if step.apart and step.input == shape else []
        if _on_arrow(step) and edges:
            edges[-1].ops += outside + _ops(step.module)
            edges[-1].dashed |= bool(outside)
        else:
            node, weight, name = _node(step), getattr(step.module, "weight", None), literal(step.name, 24)
            ops = outside + ([] if node.kind == "box" else _ops(step.module))  # a box names its layer type itself
            edges.append(
                _Edge(
                    "" if ops == [name] else name,  # not "flatten" over "flatten"
                    _shape(tuple(weight.shape)) if isinstance(weight, torch.Tensor) and weight.dim() > 1 else "",
                    ops,
                    dashed=bool(outside),
                )
            )
            nodes.append(node)
        shape = step.output
    if trace.output is not None:
        if trace.output != shape:
            nodes.append(_apart(trace.output))
            edges.append(_Edge(ops=["in forward()"], dashed=True))
        elif edges:
            edges[-1].ops.append("forward() ops")
    return nodes, edges


def _text_width(renderer: RendererAgg, text: str, size: float = FONT) -> float:
    width, _, _ = renderer.get_text_width_height_descent(text, FontProperties(size=size), ismath=False)
    return width / renderer.dpi


def _wrap(renderer: RendererAgg, parts: list[str], limit: float, joiner: str = ", ") -> list[str]:
    """Parts joined into lines no wider than `limit` inches (a part wider than that gets a line of its own)."""
    lines: list[str] = []
    for part in parts:
        if lines and _text_width(renderer, lines[-1] + joiner + part) <= limit:
            lines[-1] += joiner + part
        else:
            lines.append(part)
    return lines


def _measure(renderer: RendererAgg, nodes: list[_Node], edges: list[_Edge]) -> None:
    """Each node's drawing size (the side of a map grows with its height and width, a bar with its length, so the
    shrinking is seen) and width with its label; each arrow's width with its texts."""
    sides = [max(v, 1) for n in nodes if n.kind == "maps" for v in n.shape[1:]]
    lengths = [max(n.shape[0], 1) for n in nodes if n.kind == "bar"]
    for node in nodes:
        if node.kind == "maps":
            channels, height, width = node.shape
            node.stacked = 1 if channels == 1 else min(5, 2 + int(math.log2(channels)) // 2)  # a few, more for more
            side = [0.1 + 0.55 * (v / max(sides)) ** 0.7 for v in (width, height)]
            node.size = (side[0] + (node.stacked - 1) * DEPTH, side[1] + (node.stacked - 1) * DEPTH)
        elif node.kind == "bar":
            node.size = (0.12, 0.15 + 0.65 * (node.shape[0] / max(lengths)) ** 0.5)
        else:
            node.size = (_text_width(renderer, node.inside) + 0.14, 0.28)
        node.width = max(node.size[0], _text_width(renderer, _shape(node.shape), FONT)) + 0.06
    for edge in edges:
        edge.lines = _wrap(renderer, edge.ops, 0.8)  # narrow arrows: Network3 fits two rows
        texts = [edge.name, edge.weight, *edge.lines]
        edge.width = max(0.36, *(_text_width(renderer, text) + 0.12 for text in texts if text))


def _rows(nodes: list[_Node], edges: list[_Edge], limit: float) -> list[tuple[int, int]]:
    """Nodes [start, end) per row, filled left to right up to `limit` inches."""
    rows, start, used = [], 0, nodes[0].width
    for i in range(1, len(nodes)):
        more = edges[i - 1].width + nodes[i].width
        turn = STUB if i < len(nodes) - 1 else 0.0  # room for the arrow's turn to the next row
        if used + more + turn > limit:
            rows.append((start, i))
            start, used = i, STUB + more
        else:
            used += more
    return [*rows, (start, len(nodes))]


def _balanced(nodes: list[_Node], edges: list[_Edge]) -> list[tuple[int, int]]:
    """As few rows as fit the page, as even in width as they can be (not a full row and a stub)."""
    available = WIDTH - 2 * MARGIN
    count = len(_rows(nodes, edges, available))
    low, high = 0.0, available
    for _ in range(30):  # the narrowest limit that still needs no more rows
        middle = (low + high) / 2
        low, high = (middle, high) if len(_rows(nodes, edges, middle)) > count else (low, middle)
    return _rows(nodes, edges, high)


def _draw_node(ax: Axes, node: _Node, x: float, y: float) -> None:
    """`node` centred on (x, y): its drawing, and its shape under it."""
    width, height = node.size
    style = {"edgecolor": "#333333", "linewidth": 0.7, "linestyle": "--" if node.dashed else "-"}
    if node.kind == "maps":
        stacked = node.stacked
        front = (width - (stacked - 1) * DEPTH, height - (stacked - 1) * DEPTH)
        left, bottom = x - width / 2, y - height / 2
        for j in reversed(range(stacked)):  # the back one first, so each nearer one covers it
            corner = (left + j * DEPTH, bottom + j * DEPTH)
            ax.add_patch(Rectangle(corner, *front, facecolor=node.fill, zorder=3 + stacked - j, **style))
    elif node.kind == "bar":
        ax.add_patch(Rectangle((x - width / 2, y - height / 2), width, height, facecolor=node.fill, zorder=3, **style))
    else:
        box = FancyBboxPatch(
            (x - width / 2, y - height / 2), width, height, boxstyle="round,pad=0,rounding_size=0.04",
            facecolor=node.fill, zorder=3, **style,
        )  # fmt: skip
        ax.add_patch(box)
        ax.text(x, y, node.inside, ha="center", va="center", fontsize=FONT, zorder=9)
    ax.text(x, y - height / 2 - 0.04, _shape(node.shape), ha="center", va="top", fontsize=FONT, zorder=9)


def _draw_edge_texts(ax: Axes, edge: _Edge, x: float, y: float) -> None:
    """The name and weight shape stacked over the arrow at (x, y), what the layer does under it."""
    over = [(edge.weight, "black"), (edge.name, GREY)]
    for i, (text, color) in enumerate(t for t in over if t[0]):
        ax.text(x, y + 0.035 + i * LINE, text, ha="center", va="bottom", fontsize=FONT, color=color)
    for i, text in enumerate(edge.lines):
        ax.text(x, y - 0.035 - i * LINE, text, ha="center", va="top", fontsize=FONT)


def _arrow(ax: Axes, points: list[tuple[float, float]], dashed: bool) -> None:
    ax.add_patch(
        FancyArrowPatch(
            path=Path(points), arrowstyle="-|>", mutation_scale=7, linewidth=0.8, color="#333333",
            linestyle="--" if dashed else "-", shrinkA=0, shrinkB=0, zorder=2,
        )
    )  # fmt: skip


def _message(text: str, title: str) -> Figure:
    """A figure that says why there is no drawing."""
    figure = Figure(figsize=(WIDTH, 1.0), dpi=DPI)
    if title:
        figure.suptitle(literal(title, 200), fontsize=9)
    figure.text(0.5, 0.45, text, ha="center", va="center", fontsize=FONT + 0.5, wrap=True)
    return figure


CAPTION = (
    "Shapes are for one image (C×H×W, or a vector's length). Over each arrow: the layer and its weight shape "
    "(conv: out×in×kh×kw, linear: out×in); under it: what the layer does."
)
DASHED = "Dashed: done in forward() outside its layers (not a layer; the shape is measured)."


def network_figure(net: nn.Module, title: str = "") -> Figure:
    """The network drawn from the module: each conv and pool output as a stack of feature maps, each vector as a bar,
    each layer's name, weight shape and operation on the arrow into its output; 6.7 inches wide (A4's text width).

    Drawn from one blank image passed through it (as `size_arithmetic` does), so it is right for any settings and
    draws a model of one's own too: a layer it has no picture for as a box with its output shape.
    """
    trace = _trace(net)
    if trace.input is None or not trace.steps:
        why = trace.error or f"{type(net).__name__} called no layer on one blank {_shape(trace.input)} image"
        return _message(f"Nothing to draw: {literal(why, 300)}.", title)
    nodes, edges = _diagram(trace)
    figure = Figure(figsize=(WIDTH, 1.0), dpi=DPI)
    renderer = FigureCanvasAgg(figure).get_renderer()
    _measure(renderer, nodes, edges)
    rows = _balanced(nodes, edges)
    dashed = [DASHED] if any(edge.dashed for edge in edges) else []
    notes = _wrap(renderer, " ".join([CAPTION, *dashed]).split(), WIDTH - 2 * MARGIN, joiner=" ")
    notes += _wrap(renderer, literal(trace.error, 300).split(), WIDTH - 2 * MARGIN, joiner=" ")  # on a line of its own

    # Rows top to bottom; in each, how far the drawings and texts reach over and under the arrows' line.
    reach = []
    for start, end in rows:
        into = edges[max(start - 1, 0) : end - 1]
        over = [n.size[1] / 2 for n in nodes[start:end]]
        over += [0.05 + LINE * (bool(e.name) + bool(e.weight)) for e in into]
        under = [n.size[1] / 2 + 0.05 + LINE for n in nodes[start:end]]
        under += [0.05 + LINE * len(e.lines) for e in into]
        reach.append((max(over), max(under)))
    heading = 0.3 if title else 0.0
    height = 2 * MARGIN + heading + sum(a + b for a, b in reach) + ROW_GAP * (len(rows) - 1) + 0.12 + LINE * len(notes)
    figure.set_size_inches(WIDTH, height)
    ax = figure.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, WIDTH)
    ax.set_ylim(0, height)  # data units are inches: each size above is the size printed
    ax.set_axis_off()
    if title:
        ax.text(WIDTH / 2, height - MARGIN, literal(title, 200), ha="center", va="top", fontsize=9)

    top, turn = height - MARGIN - heading, []  # turn: the path from the previous row's last node to this row
    for (start, end), (over, under) in zip(rows, reach, strict=True):
        y = top - over
        lead = start > 0
        used = (STUB + edges[start - 1].width if lead else 0) + sum(n.width for n in nodes[start:end])
        used += sum(e.width for e in edges[start : end - 1]) + (STUB if end < len(nodes) else 0)
        spread = edges[max(start - 1, 0) : end - 1]
        extra = min(max(WIDTH - 2 * MARGIN - used, 0) / max(len(spread), 1), 0.6)  # arrows stretched, not too long
        x = MARGIN + (WIDTH - 2 * MARGIN - used - extra * len(spread)) / 2  # a row narrower than the page: centred
        # Each arrow runs from one drawing's edge to the next one's; its texts are centred in the room between them.
        if lead:  # the arrow from the row above: down beside the row's start, then into its first node
            edge, into = edges[start - 1], nodes[start]
            x += STUB / 2
            tip = (x + STUB / 2 + edge.width + extra + (into.width - into.size[0]) / 2, y)
            _arrow(ax, [*turn, (x, turn[-1][1]), (x, y), tip], edge.dashed)
            _draw_edge_texts(ax, edge, x + STUB / 2 + (edge.width + extra) / 2, y)
            x += STUB / 2 + edge.width + extra
        for i in range(start, end):
            node = nodes[i]
            _draw_node(ax, node, x + node.width / 2, y)
            x += node.width
            if i < end - 1:
                edge, into = edges[i], nodes[i + 1]
                tail = x - (node.width - node.size[0]) / 2
                tip = x + edge.width + extra + (into.width - into.size[0]) / 2
                _arrow(ax, [(tail, y), (tip, y)], edge.dashed)
                _draw_edge_texts(ax, edge, x + (edge.width + extra) / 2, y)
                x += edge.width + extra
        # Out of the last node to the right and down between the rows: the next row's arrow goes on from there.
        last = nodes[end - 1]
        below = y - under - ROW_GAP / 2
        turn = [(x - (last.width - last.size[0]) / 2, y), (x + STUB, y), (x + STUB, below)]
        top = y - under - ROW_GAP
    for i, note in enumerate(notes):
        ax.text(MARGIN, MARGIN + (len(notes) - 1 - i) * LINE, note, ha="left", va="bottom", fontsize=FONT, color=GREY)
    return figure
