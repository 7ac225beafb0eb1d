"""The network drawing and size arithmetic for the lab report: why fc1 takes 192 values (96 for Network3), each
rounding down said, a model of one's own drawn without a formula it cannot have, and a figure that prints legibly."""

import itertools
from pathlib import Path

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.text import Text
from torch import nn

from cnn_exp.net import ConvNet
from cnn_exp.netdraw import network_figure, size_arithmetic
from cnn_exp.plots import pixels

EXTEND = Path(__file__).parent / "extend"
NETWORK2 = [
    "conv1: (28 + 2×0 − 5) / 1 + 1 = 24 → 6×24×24",
    "conv1_pool: ⌊24 / 2⌋ = 12 → 6×12×12",
    "conv2: (12 + 2×0 − 5) / 1 + 1 = 8 → 12×8×8",
    "conv2_pool: ⌊8 / 2⌋ = 4 → 12×4×4",
    "conv2_pool gives 12 × 4 × 4 = 192 values, so fc1 takes 192",
]


def network3() -> ConvNet:
    return ConvNet(channels=[6, 12, 24], kernel_size=[5, 5, 2], padding=[0, 0, 1])


def texts(figure: Figure) -> list[str]:
    return [t.get_text() for t in figure.findobj(Text) if t.get_text()]


def test_network2_gives_each_size_with_its_numbers_and_why_fc1_takes_192() -> None:
    assert size_arithmetic(ConvNet()) == NETWORK2


def test_network3_pools_5_to_2_and_fc1_takes_96() -> None:
    lines = size_arithmetic(network3())
    assert "conv3: (4 + 2×1 − 2) / 1 + 1 = 5 → 24×5×5" in lines
    assert "conv3_pool: ⌊5 / 2⌋ = 2 (remainder 1 dropped) → 24×2×2" in lines
    assert lines[-1] == "conv3_pool gives 24 × 2 × 2 = 96 values, so fc1 takes 96"


@pytest.mark.parametrize(("pool_first", "batch_norm"), [(True, False), (False, True), (True, True)])
def test_pool_first_and_batch_norm_keep_the_arithmetic_and_leave_the_model_as_it_was(
    pool_first: bool, batch_norm: bool
) -> None:
    net = ConvNet(pool_first=pool_first, batch_norm=batch_norm, dropout=0.5)
    net.conv1.eval()  # one layer in eval mode on purpose: each module's own mode comes back, not net.train()'s
    state = {k: v.clone() for k, v in net.state_dict().items()}
    assert size_arithmetic(net) == NETWORK2  # batch norm, ReLU and dropout keep the shape: no lines of their own
    assert [m.training for m in net.modules()] == [m is not net.conv1 for m in net.modules()]
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())  # batch norm learnt no statistics


def test_an_odd_size_is_rounded_down_by_the_pool() -> None:
    lines = size_arithmetic(ConvNet(image_size=29))
    assert lines[:2] == [
        "conv1: (29 + 2×0 − 5) / 1 + 1 = 25 → 6×25×25",
        "conv1_pool: ⌊25 / 2⌋ = 12 (remainder 1 dropped) → 6×12×12",
    ]
    assert lines[-1] == "conv2_pool gives 12 × 4 × 4 = 192 values, so fc1 takes 192"


class Strided(nn.Sequential):
    """A non-square image through strides, dilation, ceil_mode, a non-square pool, padding 'same', a layer without a
    formula and an adaptive pool: each formula must match the shape measured, or its line would say 'measured'."""

    input_shape, num_classes = (3, 20, 27), 5

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 4, 3, stride=2, dilation=2),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
            nn.AvgPool2d((2, 3)),
            nn.Conv2d(4, 4, 3, padding="same"),
            nn.Upsample(scale_factor=2),  # no formula here: drawn as a box, its size measured
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 5),
        )


def test_non_square_strided_dilated_and_rounded_up_sizes_follow_the_module_settings() -> None:
    assert size_arithmetic(Strided()) == [
        "0: height ⌊(20 + 2×0 − 2×(3 − 1) − 1) / 2⌋ + 1 = 8 (remainder 1 dropped), "
        "width (27 + 2×0 − 2×(3 − 1) − 1) / 2 + 1 = 12 → 4×8×12",
        "1: height ⌈(8 + 2×0 − 3) / 2⌉ + 1 = 4, width ⌈(12 + 2×0 − 3) / 2⌉ + 1 = 6 → 4×4×6",
        "2: height ⌊4 / 2⌋ = 2, width ⌊6 / 3⌋ = 2 → 4×2×2",
        "3: padding 'same' keeps 2×2 → 4×2×2",
        "4 (Upsample): measured: 4×4×4",
        "5 (AdaptiveAvgPool2d): measured: 4×1×1",
        "5 gives 4 × 1 × 1 = 4 values, so 7 takes 4",
    ]
    figure = network_figure(Strided())
    assert {"3×20×27", "4×8×12", "Upsample", "4×4×4", "adaptive avg-pool", "5×4"} <= set(texts(figure))
    assert overlaps(figure) == []


def test_a_model_of_ones_own_is_drawn_and_what_forward_does_outside_its_layers_is_measured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(EXTEND))
    from mynets import ResNetlet

    net = ResNetlet()
    lines = size_arithmetic(net)
    assert lines[0] == "stem: (28 + 2×1 − 3) / 1 + 1 = 28 → 16×28×28"
    assert "blocks.1's 16×28×28 outside its layers" in lines[-1]
    assert "cannot be computed" in lines[-1] and lines[-1].endswith("measured: 16")
    figure = network_figure(net)
    assert {"stem", "16×1×3×3", "16×28×28", "in forward()", "10×16"} <= set(texts(figure))
    assert pixels(figure).shape[1] == 1340


class Functional(nn.Module):
    input_shape, num_classes = (1, 28, 28), 10

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)[:, :10]


class Broken(nn.Module):
    input_shape, num_classes = (1, 28, 28), 10

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 2, 3), nn.Linear(7, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(images))  # no flatten, and 7 inputs: fails on any image


def test_a_model_without_layers_or_whose_forward_fails_says_so_and_never_crashes() -> None:
    assert size_arithmetic(Functional()) == ["Functional called no layer: there is nothing to compute"]
    assert any(
        text.startswith("Nothing to draw: Functional called no layer") for text in texts(network_figure(Functional()))
    )
    lines = size_arithmetic(Broken())
    assert lines[0] == "conv: (28 + 2×0 − 3) / 1 + 1 = 26 → 2×26×26"
    assert lines[1].startswith("forward() failed on one blank 1×28×28 image: RuntimeError")
    assert "2×26×26" in texts(network_figure(Broken()))  # what was seen before it failed
    assert "has no input_shape" in size_arithmetic(nn.Linear(3, 4))[0]


def overlaps(figure: Figure) -> list[tuple[str, str]]:
    """Pairs of texts that overlap each other or a drawn feature map or bar, or leave the figure."""
    renderer = FigureCanvasAgg(figure).get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in figure.findobj(Text) if t.get_text()]
    shapes = [("a drawing", p.get_window_extent(renderer)) for p in figure.findobj(Rectangle) if p.axes]
    page = figure.bbox
    clashes = [(a, b) for (a, x), (b, y) in itertools.combinations(boxes, 2) if x.overlaps(y)]
    clashes += [(a, b) for (a, x), (b, y) in itertools.product(boxes, shapes) if x.overlaps(y)]
    outside = [(a, "the page") for a, x in boxes if not (page.contains(x.x0, x.y0) and page.contains(x.x1, x.y1))]
    return clashes + outside


def test_network2_figure_shows_its_shapes_legibly_at_a4_width() -> None:
    figure = network_figure(ConvNet(), title="Network2")
    shown = texts(figure)
    assert {"192", "6×1×5×5", "12×4×4", "120×192", "1×28×28", "conv1", "max-pool 2×2", "flatten"} <= set(shown)
    assert figure.get_figwidth() == pytest.approx(6.7)  # 17 cm: printed at its own size on A4
    assert min(t.get_fontsize() for t in figure.findobj(Text) if t.get_text()) >= 7
    assert overlaps(figure) == []
    image = pixels(figure)
    assert image.shape[1] == 1340 and 400 < image.shape[0] < 900
    assert (image < 128).any() and (image > 250).mean() > 0.5  # drawn, on a mostly white page


def test_network3_and_six_conv_blocks_with_four_hidden_layers_fit_without_overlap() -> None:
    assert "96" in texts(network3_figure := network_figure(network3()))
    assert overlaps(network3_figure) == []
    six = ConvNet(
        channels=[8, 16, 32, 64, 64, 64],
        kernel_size=3,
        padding=1,
        pool=[True, True, True, True, False, False],
        hidden=[256, 128, 64, 32],
        batch_norm=True,
        dropout=0.5,
    )
    figure = network_figure(six)
    assert overlaps(figure) == []
    assert figure.get_figheight() < 9.5  # it fits an A4 page's height too
