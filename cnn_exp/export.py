"""test.py export=onnx: the trained network as model.onnx for ONNX Runtime, checked against PyTorch before success.

The model takes `images`, a batch of any size of float images made and normalized as in training (for MNIST:
N×1×28×28, framed white on black, (pixel / 255 - mean) / std; cnn_exp/predict.py), and returns `logits`, N×classes
(softmax them for probabilities; a network trained with classifier.flip_average returns its flip-averaged scores,
as test.py scores). Its metadata holds what a program needs to use it: `classes` (JSON list, in output order),
`mean`, `std` (JSON: a number, or one per channel), `dataset`, and `input`/`output` descriptions; ONNX Runtime reads
them with `session.get_modelmeta().custom_metadata_map`.
"""

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from cnn_exp import atomic, build
from cnn_exp.classifier import views_averaged
from cnn_exp.errors import UserError, shown
from cnn_exp.predict import check_output, from_checkpoint, writing

log = logging.getLogger(__name__)
# The exporter's graph passes report each step at INFO, which the run's console would show: a hundred lines.
for name in ("onnx_ir", "onnxscript"):
    logging.getLogger(name).setLevel(logging.WARNING)

FORMATS = ("onnx",)
# ONNX Runtime and PyTorch compute the same float32 network with other kernels: their logits differ by rounding
# (about 1e-6 here). More than this is a wrong export, not rounding.
TOLERANCE = 1e-4  # |onnx - torch| <= TOLERANCE + TOLERANCE * |torch|, per logit
CHECKED = 100  # test images the export is checked on


def run(cfg: DictConfig) -> None:
    """Export the checkpoint's network to model.onnx in the run directory, once ONNX Runtime agrees with PyTorch."""
    if cfg.export not in FORMATS:
        raise UserError(f"export={cfg.export}: the one format is onnx (export=onnx)")
    path = Path(cfg.paths.output_dir) / "model.onnx"
    check_output(path)
    data = {"data_dir": cfg.paths.data_dir, "mirror": cfg.paths.data_mirror}
    model, datamodule = from_checkpoint(cfg.ckpt_path, **data)
    checked_on = "test images"
    try:
        images = test_images(datamodule, CHECKED)
    except UserError as err:  # its data is elsewhere (a folder of one's own): the check runs on random images
        log.warning("checking the export on random images, not test images: %s", err)
        images = torch.randn(CHECKED, *datamodule.input_shape, generator=torch.Generator().manual_seed(0))
        checked_on = "random images"
    flip, shift = model.hparams.flip_average, model.hparams.get("shift_average", 0)
    net = (ViewsAveraged(model.net, flip, shift) if flip or shift else model.net).eval()
    shape = "×".join(map(str, datamodule.input_shape))
    description = getattr(datamodule, "input_description", "as the DataModule serves them")
    metadata = {
        "classes": json.dumps(list(datamodule.classes)),
        **{key: json.dumps(datamodule.hparams[key]) for key in ("mean", "std") if key in datamodule.hparams},
        "dataset": str(datamodule.hparams.get("dataset", build.dotted(type(datamodule)))),
        "input": f"images: N×{shape} {description}",
        "output": "logits: N×classes float32, in the order of classes"
        + (f" (log of the mean probabilities of each image's {VIEWS[flip, bool(shift)]})" if flip or shift else ""),
        "checkpoint": str(cfg.ckpt_path),
    }
    onnx_model = to_onnx(net, metadata)
    difference = check(onnx_model, net, images)
    with writing(path), atomic.replace(path, "wb") as f:
        f.write(onnx_model)
    log.info(
        "wrote %s: ONNX Runtime's logits match PyTorch's on %d %s (largest difference %.1e, "
        "tolerance %.0e absolute + %.0e relative)",
        shown(str(path)), len(images), checked_on, difference, TOLERANCE, TOLERANCE,
    )  # fmt: skip


def test_images(datamodule: Any, count: int) -> torch.Tensor:
    """The first `count` test images as the network takes them, from the DataModule's own test loader."""
    datamodule.prepare_data()
    datamodule.setup("test")
    taken, total = [], 0
    for images, _ in datamodule.test_dataloader():
        taken.append(images.cpu())
        total += len(images)
        if total >= count:
            break
    return torch.cat(taken)[:count]


# What the exported scores average over, by (flip_average, shift_average != 0).
VIEWS = {
    (True, False): "own and its mirror's",
    (False, True): "own and its two shifted copies'",
    (True, True): "own, its two shifted copies' and their mirrors'",
}


class ViewsAveraged(torch.nn.Module):
    """The network of a checkpoint trained with classifier.flip_average or shift_average: it answers as test.py
    does."""

    def __init__(self, net: torch.nn.Module, flip: bool, shift: int) -> None:
        super().__init__()
        self.net, self.flip, self.shift = net, flip, shift
        self.input_shape = net.input_shape

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return views_averaged(self.net, images, self.flip, self.shift)


def to_onnx(net: torch.nn.Module, metadata: dict[str, str]) -> bytes:
    """The network as an ONNX model (torch.export-based exporter), any batch size, with `metadata`."""
    example = torch.zeros(2, *net.input_shape)  # two: an exporter fixes a dimension of size 1
    program = torch.onnx.export(
        net,
        (example,),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    program.model.metadata_props.update(metadata)
    return program.model_proto.SerializeToString()


def check(onnx_model: bytes, net: torch.nn.Module, images: torch.Tensor) -> float:
    """The largest difference between ONNX Runtime's and PyTorch's logits; a UserError beyond TOLERANCE."""
    import onnxruntime  # only an export needs it

    session = onnxruntime.InferenceSession(onnx_model, providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        expected = net(images).numpy()
    (logits,) = session.run(["logits"], {"images": images.numpy()})
    difference = float(np.abs(logits - expected).max())
    if not np.allclose(logits, expected, rtol=TOLERANCE, atol=TOLERANCE):
        raise UserError(
            f"export=onnx: ONNX Runtime's logits differ from PyTorch's by up to {difference:.1e} on test images "
            f"(tolerance {TOLERANCE:.0e}): model.onnx not written"
        )
    return difference
