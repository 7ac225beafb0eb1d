"""Classify your own images with a trained checkpoint: `test.py predict=PATH`, and `cnn_exp.load(...)` in Python.
Each image is first made to look like the training data (cnn_exp/images.py)."""

import csv
import glob
import inspect
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig
from PIL import Image
from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch.utils.data import DataLoader

from cnn_exp import atomic, build, checkpoints, precision
from cnn_exp.classifier import Classifier
from cnn_exp.errors import UserError, is_whole, shown
from cnn_exp.images import open_image
from cnn_exp.plots import labelled_grid, literal, pixels, write_png

log = logging.getLogger(__name__)

TOP = 3  # classes listed per image
SHOWN = 64  # images drawn in predictions.png; a larger folder shows its first 64
# What Predictor.predict takes: files, Pillow images, tensors or numpy arrays of pixels, or a list of them.
Images = str | Path | Image.Image | torch.Tensor | np.ndarray | Sequence["Images"]


def from_checkpoint(path: str | Path, **data: object) -> tuple[Classifier, L.LightningDataModule]:
    """The trained model and its data (its DataModule, rebuilt from its settings), loaded as safely as test.py does.

    `data` overrides data settings that say where the data lies (data_dir, mirror) or how it is served (batch_size),
    where the DataModule takes them; nothing else may differ.
    """
    checkpoint = checkpoints.load(path)  # refuses a missing, damaged or unsafe file with one clear message
    # Without its data settings, the DataModule would fall back to defaults: MNIST, unnormalized.
    if checkpoints.missing(checkpoint, checkpoints.DATA) or not isinstance(
        checkpoint["datamodule_hyper_parameters"], dict
    ):
        raise UserError(
            f"ckpt_path={path} does not say which data it was trained on (no datamodule_hyper_parameters): "
            "give a checkpoint written by train.py"
        )
    if missing := checkpoints.missing(checkpoint, checkpoints.MODEL):
        raise UserError(f"ckpt_path={path} is not a checkpoint written by train.py: it has no {', '.join(missing)}")
    # Checked by checkpoints.load: a DataModule a config of the run names, with plain settings of its own.
    data_class = build.data_class(checkpoint)
    accepted = inspect.signature(data_class).parameters
    values = checkpoint["datamodule_hyper_parameters"] | {key: value for key, value in data.items() if key in accepted}
    # Built from what was read and checked, as Lightning's load_from_checkpoint would, without reading it again.
    try:
        model = Classifier(**checkpoint["hyper_parameters"])
        model.load_state_dict(checkpoint["state_dict"])
        model.trained_precision = precision.trained_in(checkpoint)
        datamodule = data_class(**values)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"ckpt_path={path} is not a checkpoint written by train.py: {shown(reason)}") from None
    build.check_datamodule(datamodule, f"{build.DATA_TARGET}={build.dotted(data_class)}")
    if not all(torch.isfinite(parameter).all() for parameter in model.parameters()):
        raise UserError(f"ckpt_path={path} holds weights that are not finite numbers (its training diverged)")
    model.eval()
    return model, datamodule


@dataclass
class Predictor:
    """A trained network with its data's preprocessing and class names built in (made by `cnn_exp.load`)."""

    model: Classifier
    data: L.LightningDataModule

    @property
    def classes(self) -> list[str]:
        return list(self.data.classes)

    def prepare(self, images: Images) -> torch.Tensor:
        """What the network sees: a batch made like the data's images (its DataModule's `load_image`: for MNIST and
        Fashion-MNIST, framed as the dataset framed them, see cnn_exp/images.py) and normalized like them.

        `images`: image files, Pillow images, or pixels as tensors or arrays (values 0-255, or 0-1 in floats)
        of one image (H×W, or H×W×3 as Pillow and numpy hold colour) or a batch (N×H×W, N×1×H×W as torchvision
        holds MNIST, or N×3×H×W in colour); one,
        or a list. All are made the same way, so a dataset image in any of these forms comes out as the dataset
        stored it.
        """
        return self.normalize(torch.stack([self.data.load_image(picture) for picture in _pictures(images)]))

    def normalize(self, loaded: torch.Tensor) -> torch.Tensor:
        """Images as `load_image` gives them (values 0 to 1), stacked, as the network's input (N×H×W grey images
        too, as torchvision holds MNIST's)."""
        return self.data.normalize(loaded.reshape(-1, *self.data.input_shape))

    @property
    def dataset(self) -> str | None:
        """MNIST's or Fashion-MNIST's name; None for other data."""
        return self.data.hparams.get("dataset")

    @property
    def mean(self) -> float | list[float] | None:
        return self.data.hparams.get("mean")

    @property
    def std(self) -> float | list[float] | None:
        return self.data.hparams.get("std")

    @torch.inference_mode()
    def predict(self, images: Images) -> torch.Tensor:
        """Class probabilities, N×classes: row i for image i, column j for `classes[j]`."""
        batch = self.prepare(images).to(self.model.device)
        return self.model.predict_step(batch, 0).cpu()

    def top(self, probabilities: torch.Tensor, k: int = TOP) -> list[list[tuple[str, float]]]:
        """Per image, its k likeliest classes by name with their probabilities, likeliest first."""
        classes = self.classes
        values, indices = probabilities.topk(min(k, len(classes)), dim=1)
        return [
            [(classes[i], p) for i, p in zip(row_indices, row_values, strict=True)]
            for row_indices, row_values in zip(indices.tolist(), values.tolist(), strict=True)
        ]


def load(path: str | Path, models: Sequence[type | str] = (), data: Sequence[type | str] = ()) -> Predictor:
    """A checkpoint of train.py, ready to classify images: `cnn_exp.load("…/best.ckpt").predict(["a.png"])`.

    Loaded as safely as test.py loads it (no code stored in the file ever runs), with the checkpoint's own
    preprocessing, normalization and class names. A network or DataModule of your own is built only if `models` or
    `data` names its class (the class, or the dotted name its config's _target_ gave): a checkpoint never decides
    which code is imported.
    """
    for group, classes in (("model", models), ("data", data)):
        for cls in classes:
            build.trust(group, cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}")
    model, datamodule = from_checkpoint(path)
    named = f"{build.DATA_TARGET}={build.dotted(type(datamodule))}"
    build.check_datamodule(datamodule, named, build.PREDICT_INTERFACE)
    return Predictor(model, datamodule)


def _pictures(images: Images) -> list[Image.Image]:
    """Pillow images from what `Predictor.prepare` takes."""
    if isinstance(images, str | Path):
        return [open_image(images)]
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, torch.Tensor | np.ndarray):
        pixels = torch.as_tensor(images).detach().cpu()
        if pixels.dim() == 3 and pixels.shape[-1] in (3, 4) and pixels.shape[0] > 4:  # H×W×C, as Pillow gives one
            pixels = pixels[..., :3].permute(2, 0, 1)[None]
        pixels = pixels[None, None] if pixels.dim() == 2 else pixels[:, None] if pixels.dim() == 3 else pixels
        if pixels.dim() != 4 or pixels.shape[1] not in (1, 3):
            raise ValueError(
                f"pixels of shape {list(images.shape)}: give H×W, N×H×W, N×1×H×W or N×3×H×W (grey or colour images)"
            )
        if pixels.is_floating_point():
            pixels = pixels.clamp(0, 1) * 255
        pixels = pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        return [Image.fromarray(image.squeeze(-1).numpy()) for image in pixels]
    if isinstance(images, Sequence):
        return [picture for item in images for picture in _pictures(item)]
    raise TypeError(f"cannot classify a {type(images).__name__}: give files, Pillow images, tensors or arrays")


def image_files(spec: str) -> list[Path]:
    """The files predict= names: one file, every file in a folder (not its subfolders or hidden files), or a glob."""
    if not spec.strip():  # Path("") would be the current folder
        raise UserError("predict= needs an image file, a folder of images or a glob")
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise UserError(f"predict={spec}: the folder holds no files")
        return files
    if path.is_file():
        return [path]
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file())
        if not files:
            raise UserError(f"predict={spec}: the pattern matches no file")
        return files
    raise UserError(f"predict={spec}: no such file or folder")


@dataclass
class Prediction:
    """One file's prediction, as predict= prints, writes and draws it."""

    file: Path
    seen: torch.Tensor  # C×H×W, values 0 to 1: the image as the network saw it before normalization
    top: list[tuple[str, float]]


def run(cfg: DictConfig) -> None:
    """test.py predict=PATH: classify the images PATH names; print, and write predictions.csv and .png."""
    check_batch_size(cfg.get("batch_size"))
    if cfg.get("export"):
        raise UserError("predict= and export= are two separate runs of test.py: give one of them")
    output_dir = Path(cfg.paths.output_dir)
    check_output(output_dir / "predictions.csv", output_dir / "predictions.png")
    files = image_files(str(cfg.predict))
    predictor = load(cfg.ckpt_path)
    framed, read, bad = [], [], []
    for file in files:
        try:
            framed.append(predictor.data.load_image(open_image(file), name=str(file)))
            read.append(file)
        except UserError as err:
            bad.append(str(err))
    if not read:  # one file: its error; a folder or glob: each file's
        raise UserError(
            f"predict={bad[0]}"
            if Path(str(cfg.predict)).is_file()
            else f"predict={cfg.predict}: none is an image it can read: {'; '.join(bad)}"
        )
    for reason in bad:  # the others are classified all the same
        log.warning("skipped %s", reason)

    # One device and process: predicting a few images needs no more, and the files keep their order.
    trainer: L.Trainer = build.instantiated(
        cfg.trainer, "trainer", logger=False, callbacks=[], devices=1, num_nodes=1, strategy="auto",
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    seen = torch.stack(framed)
    loader = DataLoader(predictor.normalize(seen), batch_size=cfg.get("batch_size") or 256)
    probabilities = torch.cat(trainer.predict(predictor.model, dataloaders=loader))
    predictions = [
        Prediction(file, image, top)
        for file, image, top in zip(read, seen, predictor.top(probabilities.float()), strict=True)
    ]
    _print(predictions)
    with writing(output_dir / "predictions.csv"):
        write_csv(output_dir / "predictions.csv", predictions)
    image = pixels(figure(predictions, f"{Path(str(cfg.ckpt_path)).name} on {cfg.predict}"))
    with writing(output_dir / "predictions.png"):
        write_png(image, output_dir / "predictions.png")
    log.info("%d images classified, %d skipped: %s", len(read), len(bad), output_dir / "predictions.csv")


def check_batch_size(value: object) -> None:
    """test.py's batch_size=: null (the checkpoint's own; predict= takes 256 images a batch) or a whole number of at
    least 1, refused before any work (torch would fail on it deep inside, or 0 would quietly mean null)."""
    if value is not None and (not is_whole(value) or value < 1):
        raise UserError(f"batch_size={value} must be a whole number of at least 1, or null")


def check_output(*paths: Path) -> None:
    """Refuse, before any work, a file this run is to write where a folder of its name stands."""
    for path in paths:
        if path.is_dir():
            raise UserError(
                f"{path} is a folder, where this run writes its file: move the folder away, or give the run another "
                "directory (hydra.run.dir=...)"
            )


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Writing `path`: a disk or file that refuses it (read-only, full, an immutable file) is one UserError naming
    it, not a traceback."""
    try:
        yield
    except OSError as err:
        raise UserError(
            f"cannot write {path} ({err.strerror or type(err).__name__}): give the run a directory it can write to "
            "(hydra.run.dir=...)"
        ) from None


def _print(predictions: list[Prediction]) -> None:
    """A table: per file, its likeliest classes with their probabilities. File and class names are data (`shown`,
    and `Text`, not Rich markup): a name like `[1].png` or one holding an escape sequence prints as it is written."""
    table = Table("file", *(["1st", "2nd", "3rd"][: len(predictions[0].top)]), title="predictions")
    for prediction in predictions:
        table.add_row(
            Text(shown(prediction.file.name)), *(Text(f"{shown(name)} {p:.1%}") for name, p in prediction.top)
        )
    Console().print(table)


def write_csv(path: Path, predictions: list[Prediction]) -> None:
    """One row per image: file, predicted class, its probability, and the top classes as `name=p; ...`."""
    # A file name that is not UTF-8 (Python holds its bytes as surrogates) is written as the bytes it was.
    with atomic.replace(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "predicted", "probability", "top3"])
        for prediction in predictions:
            (name, p), *_ = prediction.top
            ranked = "; ".join(f"{c}={q:.4f}" for c, q in prediction.top)
            writer.writerow([str(prediction.file), name, f"{p:.4f}", ranked])


def figure(predictions: list[Prediction], title: str) -> Figure:
    """Each image as the network saw it (the first SHOWN of them), with its file name and prediction below (both
    drawn as text, `literal`: a `$` in a name would start a formula)."""
    drawn = predictions[:SHOWN]
    title = literal(title, 200)
    if len(predictions) > SHOWN:
        title += f" (the first {SHOWN} of {len(predictions)})"
    captions = [f"{literal(p.file.name, 16)}\n{literal(p.top[0][0])} {p.top[0][1]:.0%}" for p in drawn]
    images = [p.seen for p in drawn]
    return labelled_grid(images, captions, title, columns=8, side=1.4, cell=1.7, fontsize=8, values_0_to_1=True)
