"""The lab's convolutional networks (Network2, Network3) as one configurable class."""

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from cnn_exp.errors import UserError, is_number, is_whole


def _per_layer(value: int | Sequence[int], layers: int, name: str, kind: str = "int") -> list[int]:
    """One value for every conv layer, or a list with one value per layer."""
    if isinstance(value, str):
        raise UserError(f"model.{name}={value} must be one {kind} or a list of {layers} {kind}s")
    values = [value] * layers if isinstance(value, int) else list(value)
    if len(values) != layers:
        raise UserError(
            f"model.{name}={list(values)} has {len(values)} values but the network has {layers} conv layers: "
            f"give one {kind} or a list of {layers}"
        )
    return values


class ConvNet(nn.Module):
    """Conv → ReLU → 2×2 max-pool blocks, a flatten, Linear → ReLU layers, and a linear output layer.

    Optional, off in the notebook's networks: batch norm after each convolution, dropout after each hidden layer,
    a block without its pool (`pool=[true, true, false]` hands fc1 conv3's whole 7×7 map instead of 3×3 of it),
    and `pool_first`: each block pools its convolution's map before batch norm and ReLU, so both work on a
    quarter of the values (12–20 % less time an epoch for `fashion_best`'s network on a 2-core CPU, fp32). Without batch
    norm that is the same function (ReLU and max-pool commute); with it, the norm's statistics are the pooled map's.

    Initialization (`init`, default: torch's): `dirac` starts every conv after the first as an identity of its input
    channels; `whiten` sets conv1's filters from the training images' patch statistics (init_from_data).
    `bn_momentum`: how far batch norm's running statistics move to each batch's (torch's 0.1; higher follows a
    fast-changing network, as a short run's is, more closely).

    Layers are named as in the notebook (conv1, conv2, …, fc1, fc2, out), so its parameter names and shapes
    carry over, and forward() calls them in the notebook's order. ReLU, pool, flatten and dropout are named layers
    too (conv1_relu, conv1_pool, …), not functional calls, so the layer table and the TensorBoard graph show every
    step. fc1's input size is measured by passing one blank image through the conv blocks rather than hard-coded
    as in the notebook, so padding, kernel sizes and widths can be overridden and swept freely.
    """

    def __init__(
        self,
        channels: Sequence[int] = (6, 12),
        kernel_size: int | Sequence[int] = 5,
        padding: int | Sequence[int] = 0,
        pool: bool | Sequence[bool] = True,
        pool_first: bool = False,
        hidden: Sequence[int] = (120, 60),
        batch_norm: bool = False,
        bn_momentum: float = 0.1,
        dropout: float = 0.0,
        init: Sequence[str] = (),
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        channels_last: bool = True,
        compile: bool = False,
    ) -> None:
        if not is_number(dropout) or not 0 <= dropout < 1:
            raise UserError(f"model.dropout={dropout} must be at least 0 and below 1")
        kernels = _per_layer(kernel_size, len(channels), "kernel_size")
        paddings = _per_layer(padding, len(channels), "padding")
        pools = _per_layer(pool, len(channels), "pool", kind="bool")
        if not all(isinstance(p, bool) for p in pools):
            raise UserError(f"model.pool={pools}: every value must be true or false")
        if not isinstance(pool_first, bool):
            raise UserError(f"model.pool_first={pool_first} must be true or false")
        if not is_number(bn_momentum) or not 0 < bn_momentum <= 1:
            raise UserError(f"model.bn_momentum={bn_momentum} must be above 0 and at most 1")
        if isinstance(init, str) or not all(name in INITS for name in init):
            raise UserError(f"model.init={init} must be a list of {', '.join(INITS)} (e.g. [whiten,dirac]), or []")
        for name, values, least in (
            ("channels", list(channels), 1),
            ("hidden", list(hidden), 1),
            ("kernel_size", kernels, 1),
            ("padding", paddings, 0),
        ):
            if not all(is_whole(v) and v >= least for v in values):
                raise UserError(f"model.{name}={values}: every value must be a whole number of at least {least}")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        width = in_channels
        for i, (out, kernel, pad, pooled) in enumerate(zip(channels, kernels, paddings, pools, strict=True), start=1):
            # A convolution followed by batch norm needs no bias of its own: the norm's shift replaces it.
            layers[f"conv{i}"] = nn.Conv2d(width, out, kernel, padding=pad, bias=not batch_norm)
            if pooled and pool_first:
                layers[f"conv{i}_pool"] = nn.MaxPool2d(kernel_size=2, stride=2)
            if batch_norm:
                layers[f"conv{i}_bn"] = nn.BatchNorm2d(out, momentum=bn_momentum)
            layers[f"conv{i}_relu"] = nn.ReLU()
            if pooled and not pool_first:
                layers[f"conv{i}_pool"] = nn.MaxPool2d(kernel_size=2, stride=2)
            width = out
        layers["flatten"] = nn.Flatten()
        features = _output_size(layers, (in_channels, image_size, image_size))
        for j, size in enumerate(hidden, start=1):
            layers[f"fc{j}"] = nn.Linear(features, size)
            layers[f"fc{j}_relu"] = nn.ReLU()
            if dropout:
                layers[f"fc{j}_dropout"] = nn.Dropout(dropout)
            features = size
        layers["out"] = nn.Linear(features, num_classes)
        super().__init__()
        # Registered in the order forward() calls them: the layer table (named_modules) and state_dict follow it.
        for name, layer in layers.items():
            self.add_module(name, layer)
        self.pool_first = pool_first
        # The names of each block's and each hidden layer's layers, for forward() (see _conv_blocks).
        self._block_names = [
            (f"conv{i}", f"conv{i}_bn", f"conv{i}_relu", f"conv{i}_pool") for i in range(1, len(channels) + 1)
        ]
        self._hidden_names = [(f"fc{j}", f"fc{j}_relu", f"fc{j}_dropout") for j in range(1, len(hidden) + 1)]
        self.init = list(init)
        if "dirac" in self.init:
            self._dirac()
        # The model interface (cnn_exp/build.py, docs/extend.md): one image's shape, and how many classes it scores.
        self.input_shape, self.num_classes = (in_channels, image_size, image_size), num_classes
        if channels_last:  # NHWC weights, so activations follow: faster convolutions and pooling (oneDNN, cuDNN)
            self.to(memory_format=torch.channels_last)
        # Not applied here: the Classifier compiles the forward of its training steps (see there why).
        self.compile_for_training = compile

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The lab's forward(): conv → ReLU → 2×2 max-pool for each block, flatten, then fc → ReLU for each hidden
        layer, and the output layer's class scores (logits)."""
        x = images
        for conv, bn, relu, pool in self._conv_blocks():
            x = conv(x)
            if pool is not None and self.pool_first:  # pooled before batch norm and ReLU: see the class docstring
                x = pool(x)
            if bn is not None:
                x = bn(x)
            x = relu(x)
            if pool is not None and not self.pool_first:
                x = pool(x)
        x = self.flatten(x)
        for fc, relu, dropout in self._hidden_layers():
            x = relu(fc(x))
            if dropout is not None:
                x = dropout(x)
        return self.out(x)

    @torch.no_grad()
    def _dirac(self) -> None:
        """Identity init of every conv after the first (model.init=[dirac]): its first `in` filters pass their input
        channel through unchanged (centred taps), so a deep stack starts as a shallow one; wider layers keep the rest
        of their filters' default random init."""
        for conv, *_ in self._conv_blocks()[1:]:
            channels = conv.in_channels
            nn.init.dirac_(conv.weight[: min(channels, conv.out_channels), :channels])

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Whitening-style init of conv1 from training images (model.init=[whiten]), called once as training starts.

        conv1's filters become the principal directions of the images' patches (its kernel's size), largest first,
        each scaled by 1/sqrt(its variance + eps) and paired with its negative, so that after ReLU each pair passes
        one decorrelated, unit-variance feature of the patch (airbench's first layer; here its filters keep learning).
        Filters beyond twice the patch's size keep their random init.
        """
        if "whiten" not in self.init:
            return
        conv = self._conv_blocks()[0][0]
        channels, (height, width) = conv.in_channels, conv.kernel_size
        images = nn.functional.pad(images.float(), [conv.padding[1]] * 2 + [conv.padding[0]] * 2)
        patches = images.unfold(2, height, 1).unfold(3, width, 1).permute(0, 2, 3, 1, 4, 5)
        patches = patches.reshape(-1, channels * height * width).double()
        variance, directions = torch.linalg.eigh(patches.T @ patches / len(patches))
        order = variance.argsort(descending=True)
        scaled = (directions.T[order] / (variance[order, None].clamp(min=0) + eps).sqrt()).float()
        filters = torch.stack([scaled, -scaled], dim=1).reshape(-1, channels, height, width)[: conv.out_channels]
        conv.weight[: len(filters)] = filters.to(conv.weight)
        if conv.bias is not None:
            conv.bias.zero_()

    # Layers are looked up by name on every call, as nn.Sequential does, so a layer replaced after construction (say
    # by SyncBatchNorm.convert_sync_batchnorm) is the one called; a name the settings left out is looked up as None.
    # From _modules with names spelled out once: getattr(self, f"conv{i}_bn", None) and the like raise and catch an
    # AttributeError per missing layer, 20–30 µs a forward pass (of ~200 µs for one image); this takes under 1 µs.
    def _conv_blocks(self) -> list[tuple[nn.Module, nn.Module | None, nn.Module, nn.Module | None]]:
        """Each conv block's conv, batch norm, ReLU and pool; None for a layer the settings left out."""
        layers = self._modules
        return [(layers[c], layers.get(bn), layers[relu], layers.get(pool)) for c, bn, relu, pool in self._block_names]

    def _hidden_layers(self) -> list[tuple[nn.Module, nn.Module, nn.Module | None]]:
        """Each hidden layer's fc, ReLU and dropout; None for a dropout the settings left out."""
        layers = self._modules
        return [(layers[fc], layers[relu], layers.get(dropout)) for fc, relu, dropout in self._hidden_names]


# model.init's choices, applied in this order: dirac as the network is built, whiten as training starts (from data).
INITS = ("whiten", "dirac")


@torch.no_grad()
def _output_size(layers: OrderedDict[str, nn.Module], input_shape: tuple[int, int, int]) -> int:
    """Pass one blank image through `layers`; name the layer whose feature map vanishes, if one does."""
    x = torch.zeros(1, *input_shape)
    for name, layer in layers.items():
        layer.eval()  # so batch norm's running statistics do not learn the blank image (train() restores it below)
        try:
            x = layer(x)
        except RuntimeError as err:
            if "size" not in str(err):  # not a map too small for its layer: nothing the settings did
                raise
            raise UserError(
                f"model: the feature map vanishes at {name} ({layer}): its input is "
                f"{'x'.join(map(str, x.shape[1:]))} per image. Use a smaller kernel_size or more padding. "
                f"({str(err).splitlines()[0]})"
            ) from None
        layer.train()
    return x.shape[1]
