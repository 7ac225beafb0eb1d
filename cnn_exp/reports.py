"""Callbacks that report how a run went: the untrained network's scores, confusion matrices, the test report, and the
epoch table with its curves (the layer table is cnn_exp/layers.py). What they write is described in
docs/outputs.md."""

import csv
import json
import logging
import math
import re
from pathlib import Path
from time import monotonic
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from rich.table import Table
from rich.text import Text

from cnn_exp import atomic, console, inside, record, report
from cnn_exp.errors import UserError, is_number, is_whole, shown
from cnn_exp.plots import confusion_figure, curves_figure, image_grid, literal, pixels, side_by_side, write_png

log = logging.getLogger(__name__)


def _tensorboard(trainer: L.Trainer) -> TensorBoardLogger | None:
    return next((logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)), None)


def _log_per_class(trainer: L.Trainer, split: str, classes: list[str], accuracy: torch.Tensor) -> None:
    """Straight to the loggers: as `self.log` values they would crowd the progress bar and the results table.

    Each under `<split>/class_acc/<name>`, the name made a tag: a class name is data (a checkpoint's may hold
    anything), so `/` becomes `-` and any other character but a letter, digit, `_`, `.` or `-` becomes `_`
    (T-shirt/top: T-shirt-top, Ankle boot: Ankle_boot); an empty name, or one that gives another's tag, gets its class
    number.
    """
    tags: list[str] = []
    for number, name in enumerate(classes):
        tag = f"{split}/class_acc/" + (re.sub(r"[^\w.-]", "_", name.replace("/", "-"))[:64] or str(number))
        tags.append(f"{tag}_{number}" if tag in tags else tag)
    for logger in trainer.loggers:
        logger.log_metrics(dict(zip(tags, accuracy.tolist(), strict=True)), step=trainer.global_step)


class UntrainedScores(L.Callback):
    """Logs, at step 0, how unsure the untrained network is on its first training batch: the mean of each image's
    highest softmax score (about 1/classes, the notebook's "why are all the scores about 0.1?") and the loss
    (about ln(classes)); kept in `untrained.json` in `dirpath` for the report.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = Path(dirpath) if dirpath else None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> None:
        if batch_idx != 0 or trainer.global_step != 0:  # cheapest test first: it runs every step
            return
        images, labels = batch
        pl_module.eval()  # layers such as batch norm must not learn from this look
        with torch.no_grad():
            logits = pl_module(images)
        pl_module.train()
        scores = {
            "untrained/mean_max_softmax": logits.softmax(dim=1).max(dim=1).values.mean().item(),
            "untrained/loss": F.cross_entropy(logits, labels).item(),
        }
        for logger in trainer.loggers:
            logger.log_metrics(scores, step=0)
        if trainer.is_global_zero and self.dirpath is not None:
            kept = {"images": len(labels), "classes": logits.shape[1], "loss": scores["untrained/loss"],
                    "mean_max_softmax": scores["untrained/mean_max_softmax"]}  # fmt: skip
            self.dirpath.mkdir(parents=True, exist_ok=True)
            atomic.write_text(self.dirpath / "untrained.json", json.dumps(kept, indent=1) + "\n")
        if trainer.is_global_zero:
            log.info(
                "untrained network, %d images: mean highest softmax score %.3f (1/%d classes = %.3f), loss %.3f",
                len(labels),
                scores["untrained/mean_max_softmax"],
                logits.shape[1],
                1 / logits.shape[1],
                scores["untrained/loss"],
            )


class ConfusionMatrix(L.Callback):
    """After each validation: per-class accuracy as scalars, and every `every_n_epochs` (0: never) the confusion
    matrix as a TensorBoard image with the class names on its axes.
    """

    def __init__(self, every_n_epochs: int = 1) -> None:
        if not is_whole(every_n_epochs) or every_n_epochs < 0:
            raise UserError(
                f"callbacks.confusion_matrix.every_n_epochs={every_n_epochs} must be a number of epochs, 0 for never"
            )
        self.every_n_epochs = every_n_epochs

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        matrix = pl_module.val_confusion.compute()  # synced over ranks under DDP, so every rank calls it
        classes = trainer.datamodule.classes
        accuracy = matrix.diag() / matrix.sum(dim=1).clamp(min=1)
        _log_per_class(trainer, "val", classes, accuracy)
        tensorboard = _tensorboard(trainer)
        due = self.every_n_epochs and trainer.current_epoch % self.every_n_epochs == 0
        if tensorboard and trainer.is_global_zero and due:
            title = f"validation, epoch {trainer.current_epoch + 1}"
            for tag, kind in (("val/confusion_matrix", "counts"), ("val/confusion_rates", "rates")):
                image = pixels(confusion_figure(matrix, classes, title, [kind]))
                tensorboard.experiment.add_image(tag, image, global_step=trainer.global_step, dataformats="HWC")


class TestReport(L.Callback):
    """After testing: a per-class accuracy table and the most confused class pairs on the console;
    `per_class.csv`, `confusion_matrix.png` and `misclassified.png` in `dirpath`; the confusion matrix, per-class
    accuracy and a grid of sample predictions in TensorBoard.
    """

    def __init__(self, dirpath: str, samples: int = 16, misclassified: int = 16, confused_pairs: int = 5) -> None:
        for name, value in (("samples", samples), ("misclassified", misclassified), ("confused_pairs", confused_pairs)):
            if not is_whole(value) or value < 0:
                raise UserError(f"callbacks.test_report.{name}={value} must be a count: 0 (none) or more")
        self.dirpath = Path(dirpath)
        self.samples, self.misclassified, self.confused_pairs = samples, misclassified, confused_pairs

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._samples: list[torch.Tensor] = []
        self._wrong: list[torch.Tensor] = []

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: torch.Tensor,
        batch: tuple[torch.Tensor, torch.Tensor],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        images, labels = batch
        predictions = outputs.argmax(dim=1)
        # Keep (image, label, prediction) triples: the first images, and the first wrong ones.
        if sum(len(s[1]) for s in self._samples) < self.samples:
            self._samples.append((images.cpu(), labels.cpu(), predictions.cpu()))
        if sum(len(w[1]) for w in self._wrong) < self.misclassified:
            wrong = predictions != labels
            self._wrong.append((images[wrong].cpu(), labels[wrong].cpu(), predictions[wrong].cpu()))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        matrix = pl_module.test_confusion.compute().cpu()
        classes = trainer.datamodule.classes
        images = matrix.sum(dim=1)
        accuracy = matrix.diag() / images.clamp(min=1)
        _log_per_class(trainer, "test", classes, accuracy)
        if not trainer.is_global_zero:
            return
        self._print(matrix, classes)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        with open(self.dirpath / "per_class.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["class", "images", "correct", "accuracy"])
            for row in zip(classes, images.tolist(), matrix.diag().tolist(), accuracy.tolist(), strict=True):
                writer.writerow([*row[:3], f"{row[3]:.4f}"])
        with open(self.dirpath / "confusion.csv", "w", newline="") as f:  # rows: true class; columns: predicted
            writer = csv.writer(f)
            writer.writerow(["true", *classes])
            writer.writerows([name, *counts] for name, counts in zip(classes, matrix.int().tolist(), strict=True))
        # The file shows counts and rates side by side; TensorBoard, which shrinks an image to its card, one each.
        heading = f"{what_ran(trainer)}: test accuracy {float(accuracy_all(matrix)):.2%}"
        images = {
            "confusion_matrix": pixels(confusion_figure(matrix, classes, "test set", ["counts"], heading)),
            "confusion_rates": pixels(confusion_figure(matrix, classes, "test set", ["rates"], heading)),
        }
        write_png(
            side_by_side(images["confusion_matrix"], images["confusion_rates"]), self.dirpath / "confusion_matrix.png"
        )
        grids = {
            "misclassified": (
                self._wrong,
                self.misclassified,
                f"misclassified test images: true → predicted\n{heading}",
            )
        }
        grids["predictions"] = (self._samples, self.samples, f"test images (red: wrong, true → predicted)\n{heading}")
        for name, (parts, count, title) in grids.items():
            if count and (chosen := self._take(parts, count)) and len(chosen[0]):  # none asked for, or none wrong
                images[name] = pixels(image_grid(*chosen, classes, title))
        if "misclassified" in images:
            write_png(images["misclassified"], self.dirpath / "misclassified.png")
        # Saliency takes gradients, which Lightning's test loop (inference mode) turns off; a picture that cannot be
        # drawn is a warning, never the end of a finished test.
        try:
            with torch.inference_mode(False), torch.enable_grad():
                images |= self._inside(pl_module.net, classes)
        except Exception as err:
            log.warning("the pictures of inside the network could not be drawn: %s", err)
        report.write(self.dirpath)
        if tensorboard := _tensorboard(trainer):
            for name, image in images.items():
                tensorboard.experiment.add_image(
                    f"test/{name}", image, global_step=trainer.global_step, dataformats="HWC"
                )

    def _inside(self, net: torch.nn.Module, classes: list[str]) -> dict[str, Any]:
        """Inside the network, for the report and TensorBoard: conv1's filters, the feature maps of the first test
        images after each conv block, and the gradient saliency of the first misclassified ones
        (cnn_exp/inside.py); each written as a PNG beside the run's other results."""
        if not (self.samples or self.misclassified):  # no test images asked for: no pictures of them either
            return {}
        figures = {"inside/filters": inside.filters_figure(net)}
        if self.samples and self._samples:
            images, labels, _ = (part.clone() for part in self._take(self._samples, 3))  # no longer inference tensors
            figures["inside/feature_maps"] = inside.feature_maps_figure(net, images, labels, classes, count=3)
        if self.misclassified and self._wrong and (wrong := self._take(self._wrong, 6)) and len(wrong[0]):
            wrong = tuple(part.clone() for part in wrong)
            figures["inside/saliency"] = inside.saliency_figure(net, *wrong, classes, count=6)
        drawn = {name: pixels(figure) for name, figure in figures.items() if figure is not None}
        for name, image in drawn.items():
            write_png(image, self.dirpath / f"{name.removeprefix('inside/')}.png")
        return drawn

    @staticmethod
    def _take(parts: list[tuple[torch.Tensor, ...]], count: int) -> tuple[torch.Tensor, ...]:
        return tuple(torch.cat(column)[:count] for column in zip(*parts, strict=True))

    def _print(self, matrix: torch.Tensor, classes: list[str]) -> None:
        images, correct = matrix.sum(dim=1), matrix.diag()
        table = Table("class", "images", "correct", "accuracy", title="test accuracy per class")
        names = [Text(shown(name)) for name in classes]  # data: not markup, one line, no escape sequences
        for name, n, c in zip(names, images.tolist(), correct.tolist(), strict=True):
            table.add_row(name, str(n), str(c), f"{c / max(n, 1):.2%}")
        table.add_row("all", str(int(images.sum())), str(int(correct.sum())), f"{correct.sum() / images.sum():.2%}")
        confused = matrix.clone()
        confused.fill_diagonal_(0)
        pairs = Table("true", "predicted as", "images", "of the class", title="most confused pairs")
        counts, indices = confused.flatten().topk(min(self.confused_pairs, confused.numel()))
        for count, index in zip(counts.tolist(), indices.tolist(), strict=True):
            if count:
                true, predicted = divmod(index, len(classes))
                pairs.add_row(names[true], names[predicted], str(count), f"{count / max(int(images[true]), 1):.1%}")
        console.show(table, pairs)


def accuracy_all(matrix: torch.Tensor) -> torch.Tensor:
    return matrix.diag().sum() / matrix.sum().clamp(min=1)


def what_ran(trainer: L.Trainer) -> str:
    """The run in a few words, for a figure's title: network, data, optimizer and learning rate."""
    settings = trainer.lightning_module.hparams
    net = str(settings.net.get("_target_", "")).rsplit(".", 1)[-1]
    data = trainer.datamodule.hparams if trainer.datamodule is not None else {}
    source = data.get("dataset") or Path(str(data.get("root") or "")).name or type(trainer.datamodule).__name__
    optimizer = str(settings.optimizer.get("_target_", "")).rsplit(".", 1)[-1]
    return f"{net} on {source}, {optimizer} lr {settings.optimizer.get('lr')}"


class EpochTable(L.Callback):
    """`epochs.csv` (one row per epoch: train and validation loss and accuracy, learning rate at its start, seconds) and
    `curves.png` (loss and accuracy against epoch) in `dirpath`, whatever the loggers.

    epochs.csv is rewritten as each epoch ends; curves.png then too, but at most once every `redraw_every` seconds
    (drawing it takes ~0.1 s, 2-3 % of an epoch of a few seconds; TensorBoard shows the curves live), and always when
    training ends or fails.
    An epoch's train metrics are logged after every callback's epoch-end hook, so its row is completed when the
    next epoch starts or training ends. The rows travel in checkpoints: a resumed run keeps its earlier epochs.
    """

    FIELDS = ("epoch", record.TRAIN_LOSS, record.TRAIN_ACC, record.VAL_LOSS, record.VAL_ACC, "lr", "seconds")

    def __init__(self, dirpath: str, redraw_every: float = 10.0) -> None:
        if not is_number(redraw_every) or not redraw_every >= 0:
            raise UserError(f"callbacks.epoch_table.redraw_every={redraw_every} must be a number of seconds, 0 or more")
        self.dirpath, self.redraw_every = Path(dirpath), float(redraw_every)
        self._drawn: list[dict[str, Any]] = []  # the rows curves.png shows
        self._drawn_at = -math.inf
        self.rows: list[dict[str, Any]] = []
        self._epoch: dict[str, Any] | None = None  # the running epoch: its number, lr, metrics known so far
        self._started = monotonic()  # when the running epoch started
        self._trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer  # state_dict reads the metrics of an epoch that a checkpoint ends

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._begin(trainer)  # also for a run resumed mid-epoch, whose epoch start Lightning skips

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._begin(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._epoch is not None and not trainer.sanity_checking:
            self._epoch |= {name: _metric(trainer, name) for name in (record.VAL_LOSS, record.VAL_ACC)}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._epoch is not None:
            self._epoch["ended"] = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, last=True)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # The rows epochs.csv already holds (the running epoch's is not complete): the report shows this picture. Best
        # effort: a picture that cannot be drawn now must not hide why the run failed.
        try:
            self._catch_up(trainer)
        except Exception as err:
            log.warning("curves.png not redrawn as the run failed: %s", err)

    def state_dict(self) -> dict[str, Any]:
        running = None
        if self._epoch is not None:
            running = self._epoch | {"seconds": monotonic() - self._started}
            # A checkpoint written as the epoch ends (after its train metrics were logged) holds them too: a run
            # resumed from it starts with the next epoch, in a process that never saw them.
            if running.get("ended") and self._trainer is not None:
                running |= {name: _metric(self._trainer, name) for name in (record.TRAIN_LOSS, record.TRAIN_ACC)}
        return {"rows": self.rows, "running": running}

    @classmethod
    def check_state(cls, state: Any) -> None:
        """Refuse a checkpoint's table this callback cannot go on from: rows of numbers under its own field names
        (what epochs.csv and the console show), and the running epoch's the same."""

        def row_of_numbers(row: Any, extra: tuple[str, ...] = ()) -> bool:
            return (
                isinstance(row, dict)
                and is_whole(row.get("epoch"))
                and all(key in cls.FIELDS + extra for key in row)
                and all(value is None or is_number(value) for key, value in row.items() if key != "ended")
            )

        rows, running = (state.get(key) if isinstance(state, dict) else None for key in ("rows", "running"))
        if not (isinstance(rows, list) and all(map(row_of_numbers, rows))):
            raise UserError(f"its epoch table's rows are not rows of numbers under {', '.join(cls.FIELDS)}")
        if running is not None and not (
            row_of_numbers(running, ("ended",)) and running.get("ended", False) in (True, False)
        ):
            raise UserError("its epoch table's running epoch is not a row of numbers")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.check_state(state_dict)
        self.rows = list(state_dict.get("rows", []))
        self._epoch = state_dict.get("running")
        self._started = monotonic() - (self._epoch or {}).pop("seconds", 0.0)

    def _begin(self, trainer: L.Trainer) -> None:
        number = trainer.current_epoch + 1  # counted from 1, as metrics.json's "epochs"
        if self._epoch is not None and self._epoch["epoch"] == number:
            return  # begun already, by on_train_start or before the checkpoint this run resumed from
        self._finish(trainer)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self._epoch = {"epoch": number, "lr": optimizer.param_groups[0]["lr"] if optimizer else None}
        self._started = monotonic()

    def _finish(self, trainer: L.Trainer, last: bool = False) -> None:
        if self._epoch is None:
            if last:
                self._catch_up(trainer)  # rows a resumed run's checkpoint holds, never drawn by this process
            return
        row = {name: self._epoch.get(name) for name in self.FIELDS}
        for name in (record.TRAIN_LOSS, record.TRAIN_ACC):
            row[name] = self._epoch.get(name, _metric(trainer, name))
        row["seconds"] = round(monotonic() - self._started, 2)
        self.rows.append(row)
        self._epoch = None
        if not trainer.is_global_zero:
            return
        console.epoch_line(row, trainer.max_epochs)
        with atomic.replace(self.dirpath / "epochs.csv", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS)
            writer.writeheader()
            writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in self.rows)
        if last or monotonic() - self._drawn_at >= self.redraw_every:
            self._draw(trainer)
        report.write(self.dirpath)

    def _catch_up(self, trainer: L.Trainer) -> None:
        """Draw curves.png if it lacks rows that epochs.csv has."""
        if self.rows and self._drawn != self.rows and trainer.is_global_zero:
            self._draw(trainer)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The curves again, with the test accuracy the run ended with marked on them.
        # The rows as training left them: testing a checkpoint restores this callback's state from it (an earlier
        # epoch's, for the best checkpoint).
        test = trainer.callback_metrics.get(record.TEST_ACC)
        if self._drawn and test is not None and trainer.is_global_zero:
            self._draw(trainer, float(test), self._drawn)

    def _draw(self, trainer: L.Trainer, test: float | None = None, rows: list[dict[str, Any]] | None = None) -> None:
        rows = list(rows if rows is not None else self.rows)
        self._drawn, self._drawn_at = rows, monotonic()
        run = "/".join(self.dirpath.resolve().parts[-2:])  # runs/<time>, or <sweep time>/<job>
        title = f"{what_ran(trainer)}: loss and accuracy per epoch ({run})"
        write_png(pixels(curves_figure(rows, literal(title, 200), test)), self.dirpath / "curves.png")


def _metric(trainer: L.Trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return None if value is None else float(value)
