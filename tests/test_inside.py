"""The report's "Inside the network" pictures (cnn_exp/inside.py): what they show is what the network computes
(filters, strongest feature maps, gradient saliency), checked against hooks and autograd here, and drawing them
leaves the network as it was."""

import importlib.util
import re
from typing import NamedTuple

import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.text import Text
from torch import nn

from cnn_exp import inside
from cnn_exp.net import ConvNet
from cnn_exp.plots import pixels
from tests.conftest import ROOT

DIGITS = [str(d) for d in range(10)]
NET3 = {"channels": [6, 12, 24], "kernel_size": [5, 5, 2], "padding": [0, 0, 1]}


def resnetlet_class() -> type[nn.Module]:
    """docs/extend.md's example network, loaded from its file: not put in sys.modules as `mynets`, where it would
    stay for other tests of this worker (tests/test_extend.py's in-process ones import it their own way)."""
    spec = importlib.util.spec_from_file_location("inside_mynets", ROOT / "tests" / "extend" / "mynets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ResNetlet


def seeded(build, *args, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return build(*args, **kwargs)


def images(n: int = 6, shape: tuple[int, int, int] = (1, 28, 28)) -> torch.Tensor:
    """Normalized-looking images: a bright stroke on a dark ground, with noise, so every channel has structure."""
    generator = torch.Generator().manual_seed(1)
    batch = torch.randn(n, *shape, generator=generator) * 0.3 - 0.4
    batch[:, :, 6:22, 12:16] += 2.5
    return batch


def heading(figure: Figure) -> str:
    return "\n".join(text.get_text() for text in figure.texts)


class Panel(NamedTuple):
    """One picture of the feature-maps figure: an input image, or one block's row of maps."""

    image: AxesImage
    title: str  # the text just above it: "input", or the block's "name: …"
    below: list[str]  # the texts just under it, left to right: the image's class, or each map's "ch c: mean"


def bands(figure: Figure) -> list[list[Panel]]:
    """The feature-maps figure's panels, one list per image: its input, then one row of maps per block."""
    (canvas,) = figure.axes  # one axes, in inches from the top left

    def near(text: Text, left: float, right: float, y: float, va: str) -> bool:
        x, text_y = text.get_position()
        return text.get_va() == va and left - 1e-6 <= x <= right + 1e-6 and abs(text_y - y) < 0.05

    result: list[list[Panel]] = []
    for image in canvas.images:
        left, right, bottom, top = image.get_extent()
        (title,) = [t.get_text() for t in canvas.texts if near(t, left, right, top, "bottom")]
        below = sorted((t for t in canvas.texts if near(t, left, right, bottom, "top")), key=lambda t: t.get_position())
        if title == "input":
            result.append([])
        result[-1].append(Panel(image, title, [t.get_text() for t in below]))
    return result


def shown_channels(panel: Panel) -> list[tuple[int, float]]:
    """(channel, mean) under each map of one row, left to right."""
    return [(int(m[1]), float(m[2])) for m in (re.fullmatch(r"ch (\d+): (\S+)", text) for text in panel.below)]


def test_filters_figure_shows_each_of_conv1s_filters() -> None:
    net = seeded(ConvNet)
    figure = inside.filters_figure(net, title="net2")
    canvas = figure.axes[0]  # every filter on one axes, the colour bar on its own
    filters = list(zip(canvas.texts, canvas.images, strict=True))
    assert len(filters) == 6 and len(figure.axes) == 2
    assert [text.get_text() for text, _ in filters] == [f"#{o}" for o in range(6)]
    for text, image in filters:  # each filter's number centred above it
        left, right, _, top = image.get_extent()
        x, y = text.get_position()
        assert x == pytest.approx((left + right) / 2) and y < top and text.get_va() == "bottom"
    assert "conv1: weight 6×1×5×5" in heading(figure) and heading(figure).startswith("net2\n")
    weight = net.conv1.weight.detach()
    for o, (_, image) in enumerate(filters):
        # Each filter ÷ its own largest |weight|, on a diverging scale from −1 to 1 (the colour bar says so).
        expected = weight[o, 0] / weight[o, 0].abs().max()
        torch.testing.assert_close(torch.as_tensor(image.get_array().data), expected)
        assert image.get_clim() == (-1, 1)
    assert pixels(figure).ndim == 3
    assert inside.filters_figure(nn.Sequential(nn.Flatten(), nn.Linear(4, 2))) is None


def test_conv_blocks_are_the_last_4d_output_of_each_block() -> None:
    assert inside.conv_blocks(ConvNet()) == ["conv1_pool", "conv2_pool"]
    assert inside.conv_blocks(ConvNet(**NET3)) == ["conv1_pool", "conv2_pool", "conv3_pool"]
    # A block without its pool ends at its ReLU; with pool_first and batch norm, the ReLU comes last too.
    assert inside.conv_blocks(ConvNet(pool=[True, False])) == ["conv1_pool", "conv2_relu"]
    assert inside.conv_blocks(ConvNet(batch_norm=True, pool_first=True)) == ["conv1_relu", "conv2_relu"]
    # ReLU as a function (F.relu): each block's last module is its convolution.
    assert inside.conv_blocks(resnetlet_class()()) == ["stem", "blocks.0", "blocks.1"]


def test_feature_maps_show_each_images_strongest_channels() -> None:
    net = seeded(ConvNet, **NET3)
    batch, labels = images(), torch.tensor([1, 7, 3, 0, 2, 9])
    figure = inside.feature_maps_figure(net, batch, labels, DIGITS, count=3, channels=8, title="net3")
    assert pixels(figure).shape[1] == 750  # inside.WIDTH at 100 dpi
    rows = bands(figure)
    assert len(rows) == 3
    assert [band[0].below for band in rows] == [["1"], ["7"], ["3"]]
    # The outputs, found independently: hooks on the blocks, one pass of the same three images in eval mode.
    outputs: dict[str, torch.Tensor] = {}
    blocks = ["conv1_pool", "conv2_pool", "conv3_pool"]
    handles = [
        net.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
        for name in blocks
    ]
    with torch.no_grad():
        net.eval()
        net(batch[:3])
        net.train()
    for handle in handles:
        handle.remove()
    for n, (_, *maps) in enumerate(rows):
        assert [panel.title.split(":")[0] for panel in maps] == blocks
        for name, panel in zip(blocks, maps, strict=True):
            means = outputs[name][n].mean(dim=(1, 2))
            shown = shown_channels(panel)
            assert len(shown) == min(8, len(means))
            channels = [channel for channel, _ in shown]
            assert channels[0] == int(means.argmax())  # the strongest first
            # …and no channel left out is stronger than one shown.
            assert min(means[channels]) >= max([m for c, m in enumerate(means.tolist()) if c not in channels] or [0])
            assert [round(m, 2) for _, m in shown] == [round(float(means[c]), 2) for c in channels]
    assert inside.feature_maps_figure(net, batch[:0], [], DIGITS) is None
    assert inside.feature_maps_figure(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), batch, labels, DIGITS) is None


def test_saliency_is_the_gradient_magnitude_of_the_predicted_score() -> None:
    # A linear network: ∂ score_c / ∂ x is row c of its weight, so the map is |W[c]| at its largest over channels.
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 4))
    x = torch.randn(2, 2, 3, 3)
    maps, probabilities = inside.gradient_saliency(linear, x, [3, 1])
    weight = linear[1].weight.detach().view(4, 2, 3, 3)
    torch.testing.assert_close(maps, torch.stack([weight[3].abs().amax(0), weight[1].abs().amax(0)]))
    torch.testing.assert_close(probabilities, linear(x).softmax(1).detach()[[0, 1], [3, 1]])

    # A ConvNet: the figure's maps are autograd's gradients, image by image; its captions the probabilities.
    net = seeded(ConvNet)
    batch, labels, predicted = images(4), torch.tensor([1, 7, 3, 0]), torch.tensor([7, 1, 8, 6])
    figure = inside.saliency_figure(net, batch, labels, predicted, DIGITS, title="net2")
    assert "gradient saliency" in heading(figure) and pixels(figure).ndim == 3
    net.eval()
    (canvas,) = figure.axes  # every image and map on one axes, each image before its map, a caption above it
    pairs = zip(canvas.images[::2], canvas.images[1::2], canvas.texts, strict=True)
    for k, (image, saliency, caption) in enumerate(pairs):
        x = batch[k : k + 1].clone().requires_grad_(True)
        scores = net(x)
        (gradient,) = torch.autograd.grad(scores[0, predicted[k]], x)
        torch.testing.assert_close(
            torch.as_tensor(saliency.get_array().data), gradient[0].abs().amax(0), rtol=1e-4, atol=1e-7
        )
        p = float(scores.detach().softmax(1)[0, predicted[k]])
        assert caption.get_text() == f"{labels[k]} → {predicted[k]} (p={p:.2f})"
        (left, right, _, top), (map_left, *_, map_top) = image.get_extent(), saliency.get_extent()
        assert map_left > right and map_top == top  # the map beside its image
        assert caption.get_position() == (left, pytest.approx(top - 0.04)) and caption.get_va() == "bottom"
    assert inside.saliency_figure(net, batch[:0], [], [], DIGITS) is None


def test_the_network_is_left_as_it_was() -> None:
    net = seeded(ConvNet, **NET3)
    net.conv2.eval()  # a mixed mode, as a user's frozen layer has: each module's own flag comes back
    # A hook of the network's own (copied with it, it runs on the copy too: weight_norm's hook is part of what the
    # network computes); none is added to or taken from the network.
    net.conv1.register_forward_hook(lambda *_: None)
    before = {name: (m.training, len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in net.named_modules()}
    state = {key: value.clone() for key, value in net.state_dict().items()}
    batch = images()
    inside.filters_figure(net)
    inside.feature_maps_figure(net, batch, [0] * 6, DIGITS)
    inside.saliency_figure(net, batch, [0] * 6, [1] * 6, DIGITS)
    inside.conv_blocks(net)
    with pytest.raises(RuntimeError):  # images the network cannot take: a failure half-way, hooks in place
        inside.feature_maps_figure(net, torch.zeros(2, 3, 28, 28), [0, 0], DIGITS)
    after = {name: (m.training, len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in net.named_modules()}
    assert after == before
    assert all(parameter.grad is None for parameter in net.parameters())
    assert all(torch.equal(value, state[key]) for key, value in net.state_dict().items())


def test_colour_networks_and_a_network_of_ones_own() -> None:
    colour = seeded(ConvNet, in_channels=3, image_size=32)
    batch = images(3, (3, 32, 32))
    filters = inside.filters_figure(colour)
    assert [image.get_array().shape for ax in filters.axes for image in ax.images] == [(5, 5, 3)] * 6
    figures = [
        filters,
        inside.feature_maps_figure(colour, batch, [0, 1, 2], DIGITS, count=2),
        inside.saliency_figure(colour, batch, [0, 1, 2], [1, 2, 0], DIGITS),
    ]
    resnetlet = seeded(resnetlet_class())
    batch = images(3)
    figures += [
        inside.filters_figure(resnetlet),
        inside.feature_maps_figure(resnetlet, batch, [0, 1, 2], DIGITS, channels=4),
        inside.saliency_figure(resnetlet, batch, [0, 1, 2], [1, 2, 0], DIGITS),
    ]
    assert all(pixels(figure).ndim == 3 for figure in figures)
    assert "stem: weight 16×1×3×3" in heading(figures[3])
    maps = bands(figures[4])
    assert [panel.title.split(":")[0] for panel in maps[0][1:]] == ["stem", "blocks.0", "blocks.1"]
    assert all(len(shown_channels(panel)) == 4 for panel in maps[0][1:])
    assert len(bands(figures[1])) == 2


def test_class_names_are_drawn_as_data() -> None:
    net = seeded(ConvNet)
    figure = inside.saliency_figure(net, images(1), [0], [1], ["$x$", "a\nb"])
    assert figure.axes[0].texts[0].get_text().startswith(r"\$x\$ → a\nb (p=")
    pixels(figure)  # a `$` read as a formula, or an unbalanced one, would fail here
