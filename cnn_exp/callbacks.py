"""Callbacks that show a run as it goes: progress bar, layer table, early stopping, step-0 scores, confusion
matrices, test report, and the epoch table with its curves."""

import csv
import logging
import math
import re
from pathlib import Path
from time import monotonic
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping as LightningEarlyStopping
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelSummary, RichProgressBar
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_summary import ModelSummary as Summary
from rich.table import Table
from rich.text import Text
from torch import nn

from cnn_exp import atomic, console
from cnn_exp.errors import UserError, is_whole, shown
from cnn_exp.plots import confusion_figure, curves_figure, image_grid, literal, pixels, side_by_side, write_png

log = logging.getLogger(__name__)


def _shape(size: list[int] | torch.Size) -> str:
    return "×".join(map(str, size))


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        return f"Conv2d {_shape(module.kernel_size)}, padding {module.padding[0]}"
    if isinstance(module, nn.MaxPool2d):
        return f"MaxPool2d {module.kernel_size}×{module.kernel_size}"
    return type(module).__name__


def layer_rows(model: L.LightningModule) -> list[dict[str, str | int]]:
    """One row per layer of `model.net`, with shapes for one image recorded during a real forward pass.

    Lightning's ModelSummary runs `example_input_array` through the model with hooks on every module, so the
    shapes are those the code produces, for any padding, kernel or width.
    """
    summary = Summary(model, max_depth=-1)
    modules = dict(model.named_modules())
    rows = []
    for name, inputs, outputs, params in zip(
        summary.layer_names, summary.in_sizes, summary.out_sizes, summary.param_nums, strict=True
    ):
        module = modules[name]
        if not name.startswith("net.") or next(module.children(), None) is not None:
            continue
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        rows.append(
            {
                "layer": name.removeprefix("net."),
                "type": _kind(module),
                "input": _shape(inputs[1:]),  # without the batch dimension
                "output": _shape(outputs[1:]),
                "weight": _shape(weight.shape) if weight is not None else "",
                "bias": _shape(bias.shape) if bias is not None else "",
                "parameters": params,
            }
        )
    return rows


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


class ProgressBar(RichProgressBar):
    """Rich's progress bar on the run's console (cnn_exp/console.py), handed the step count and metrics only as often
    as it redraws them, counting epochs from 1, and ending on the run's final numbers.

    Lightning's bar gathers the count and every progress-bar metric after each training batch (~0.1 ms), yet draws at
    most `refresh_rate` times a second: at hundreds of batches a second, most of that work was never shown.
    """

    def __init__(self, refresh_rate: int = 10, theme: RichProgressBarTheme | None = None, **kwargs: Any) -> None:
        theme = theme or RichProgressBarTheme(metrics_text_delimiter="\n")  # a line per split (get_metrics)
        super().__init__(refresh_rate=refresh_rate, theme=theme, **kwargs)
        self._fed_at = -math.inf
        self._unfed_batch: int | None = None  # the newest batch the bar has not been told of

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if console.get().quiet:  # a sweep job: the console shows its start and result lines only
            self.disable()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = monotonic()
        if now - self._fed_at < 1 / max(self.refresh_rate, 1) and batch_idx + 1 < self.total_train_batches:
            self._unfed_batch = batch_idx
            return
        self._fed_at, self._unfed_batch = now, None
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Validation in the middle of an epoch (val_check_interval) shows where training paused.
        self._feed_unfed(trainer, pl_module)
        super().on_validation_start(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:  # two batches through an untrained network: not numbers to show beside epoch 1
            self.reset_dataloader_idx_tracker()
            return
        super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # An epoch cut short (max_steps, a stop signal) ends on a batch that may not have been shown yet.
        self._feed_unfed(trainer, pl_module)
        super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The epoch's train/* metrics are logged after every callback's on_train_epoch_end, so the bar would end on
        # the previous epoch's (or, after one epoch, none). Shown now, and the bar ended: what follows (early
        # stopping, the test) is printed below its final state, which then holds the numbers metrics.json records
        # (and not the last step's).
        if self.is_enabled and self._metric_component is not None:
            metrics = self.get_metrics(trainer, pl_module)
            self._metric_component.update({split: text for split, text in metrics.items() if " step" not in split})
        self._stop_progress()

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if self.is_disabled:
            return
        # Ended at its last batch: the test report's tables come after the finished bar, not around a live one.
        last_loader = dataloader_idx == len(trainer.num_test_batches) - 1
        if last_loader and batch_idx + 1 >= self.total_test_batches_current_dataloader:
            self._stop_progress()

    def configure_columns(self, trainer: L.Trainer) -> list:
        columns = super().configure_columns(trainer)
        columns[1].bar_width = 20  # half Lightning's: the numbers beside it fit 100 columns unwrapped
        return columns

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The numbers beside the bar, a line per split, train first as metrics.json lists them (`train: loss 0.312
        acc 0.905`, `val: ...`), then the last logged step's (`train step: loss 0.298`): so they read alike in any
        terminal instead of wrapping mid-pair."""
        lines: dict[str, list[str]] = {}
        for name, value in super().get_metrics(trainer, pl_module).items():
            if name == "v_num":  # the logger's version: the run's name, which the header already gave
                continue
            split, _, metric = name.rpartition("/")
            if metric.endswith("_step"):
                split, metric = f"{split} step", metric.removesuffix("_step")
            text = f"{value:{self.theme.metrics_format}}" if isinstance(value, float) else str(value)
            lines.setdefault(split or name, []).append(f"{metric} {text}" if split else text)
        splits = sorted(lines, key=lambda split: ("train", "val").index(split) if split in ("train", "val") else 2)
        return {split: " ".join(lines[split]) for split in splits}

    def _get_train_description(self, current_epoch: int) -> str:
        # Counted from 1: the last of 2 epochs reads Epoch 2/2 (Lightning's own bar reads Epoch 1/1).
        total = self.trainer.max_epochs
        description = f"Epoch {current_epoch + 1}" + (f"/{total}" if total and total > 0 else "")
        return f"{description:{len(self.validation_description)}}"  # as wide as "Validation": no flicker

    def _feed_unfed(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._unfed_batch is not None:
            super().on_train_batch_end(trainer, pl_module, None, None, self._unfed_batch)
            self._unfed_batch = None


class LayerTable(ModelSummary):
    """Prints the network layer by layer (shapes for one image, weight and bias shapes, parameters) and saves it
    as `architecture.md`, before training or testing. It is a ModelSummary, so the Trainer adds no other summary.
    """

    def __init__(self, dirpath: str) -> None:
        super().__init__()
        self.dirpath = Path(dirpath)
        self._shown = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._show(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._show(trainer, pl_module)

    def _show(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._shown or not trainer.is_global_zero:
            return
        self._shown = True
        rows = layer_rows(pl_module)
        total = sum(int(row["parameters"]) for row in rows)
        title = f"{type(pl_module.net).__name__}, one {_shape(pl_module.example_input_array.shape[1:])} image"
        table = Table(*rows[0], title=title)
        for row in rows:
            table.add_row(*map(str, row.values()))
        table.add_row("total", *[""] * 5, f"{total:,}", style="bold")
        console.get().print(table)
        lines = [f"# {title}", "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(map(str, row.values())) + " |" for row in rows]
        lines.append("| total |" + " |" * 5 + f" {total:,} |")
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / "architecture.md").write_text("\n".join(lines) + "\n")


class EarlyStopping(LightningEarlyStopping):
    """Lightning's early stopping, which says when it stopped and why: on the console once training has ended, and
    as `stopped` (what metrics.json records)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.best_epoch: int | None = None  # counted from 1, as the progress bar counts

    def _run_early_stopping_check(self, trainer: L.Trainer) -> None:
        best = self.best_score
        super()._run_early_stopping_check(trainer)
        if self.best_score is not best:  # a new best: Lightning keeps the tensor of the improving value
            self.best_epoch = trainer.current_epoch + 1

    @property
    def stopped(self) -> dict[str, Any] | None:
        """When and why training stopped early, or None if it did not."""
        if self.stopping_reason == EarlyStoppingReason.NOT_STOPPED:
            return None
        return {
            "epoch": self.stopped_epoch + 1,
            "monitor": self.monitor,
            "mode": self.mode,
            "patience": self.patience,
            "min_delta": abs(self.min_delta),
            "best": float(self.best_score),
            "best_epoch": self.best_epoch,
            "reason": self._reason(),
        }

    def _reason(self) -> str:
        if self.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED:
            best = f"{float(self.best_score):.4f}" + (f" at epoch {self.best_epoch}" if self.best_epoch else "")
            times = f"{self.wait_count} validation{'s' if self.wait_count != 1 else ''}"
            return f"{self.monitor} has not improved on its best ({best}) for {times} (patience {self.patience})"
        # Lightning's words for the other reasons (a threshold passed, a value not finite).
        return (self.stopping_reason_message or self.stopping_reason.name).removesuffix(" Signaling Trainer to stop.")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Now, not when it decided: the progress bar has ended by now, so this line comes below its final state.
        if (stopped := self.stopped) and trainer.is_global_zero:
            log.info("early stopping after epoch %d: %s", stopped["epoch"], stopped["reason"])

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.best_epoch = state_dict.get("best_epoch")


class EMA(EMAWeightAveraging):
    """Lightning's exponential moving average of the weights: validated, checkpointed and tested in their place.

    Lightning's callback puts a checkpoint's raw weights back into the model whenever one is loaded after training
    (it still holds its average then), so the best checkpoint would be tested with weights nobody validated. Here only
    training restores them; testing uses the checkpoint's averaged `state_dict`, as test.py and cnn_exp.load do.
    """

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


class UntrainedScores(L.Callback):
    """Logs, at step 0, how unsure the untrained network is on its first training batch: the mean of each image's
    highest softmax score (about 1/classes, the notebook's "why are all the scores about 0.1?") and the loss
    (about ln(classes)).
    """

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
        # The file shows counts and rates side by side; TensorBoard, which shrinks an image to its card, one each.
        images = {
            "confusion_matrix": pixels(confusion_figure(matrix, classes, "test set", ["counts"])),
            "confusion_rates": pixels(confusion_figure(matrix, classes, "test set", ["rates"])),
        }
        write_png(
            side_by_side(images["confusion_matrix"], images["confusion_rates"]), self.dirpath / "confusion_matrix.png"
        )
        grids = {"misclassified": (self._wrong, self.misclassified, "misclassified test images: true → predicted")}
        grids["predictions"] = (self._samples, self.samples, "test images (red: wrong, true → predicted)")
        for name, (parts, count, title) in grids.items():
            if count and (chosen := self._take(parts, count)) and len(chosen[0]):  # none asked for, or none wrong
                images[name] = pixels(image_grid(*chosen, classes, title))
        if "misclassified" in images:
            write_png(images["misclassified"], self.dirpath / "misclassified.png")
        if tensorboard := _tensorboard(trainer):
            for name, image in images.items():
                tensorboard.experiment.add_image(
                    f"test/{name}", image, global_step=trainer.global_step, dataformats="HWC"
                )

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
        console.get().print(table, pairs)


class EpochTable(L.Callback):
    """`epochs.csv` (one row per epoch: train and validation loss and accuracy, learning rate, seconds) and
    `curves.png` (loss and accuracy against epoch) in `dirpath`, rewritten as each epoch ends, whatever the loggers.

    An epoch's train metrics are logged after every callback's epoch-end hook, so its row is completed when the
    next epoch starts or training ends. The rows travel in checkpoints: a resumed run keeps its earlier epochs.
    """

    FIELDS = ("epoch", "train/loss", "train/acc", "val/loss", "val/acc", "lr", "seconds")

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
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
            self._epoch |= {name: _metric(trainer, name) for name in ("val/loss", "val/acc")}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._epoch is not None:
            self._epoch["ended"] = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer)

    def state_dict(self) -> dict[str, Any]:
        running = None
        if self._epoch is not None:
            running = self._epoch | {"seconds": monotonic() - self._started}
            # A checkpoint written as the epoch ends (after its train metrics were logged) holds them too: a run
            # resumed from it starts with the next epoch, in a process that never saw them.
            if running.get("ended") and self._trainer is not None:
                running |= {name: _metric(self._trainer, name) for name in ("train/loss", "train/acc")}
        return {"rows": self.rows, "running": running}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
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

    def _finish(self, trainer: L.Trainer) -> None:
        if self._epoch is None:
            return
        row = {name: self._epoch.get(name) for name in self.FIELDS}
        for name in ("train/loss", "train/acc"):
            row[name] = self._epoch.get(name, _metric(trainer, name))
        row["seconds"] = round(monotonic() - self._started, 2)
        self.rows.append(row)
        self._epoch = None
        if not trainer.is_global_zero:
            return
        with atomic.replace(self.dirpath / "epochs.csv", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS)
            writer.writeheader()
            writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in self.rows)
        run = "/".join(self.dirpath.resolve().parts[-2:])  # runs/<time>, or <sweep time>/<job>
        figure = curves_figure(self.rows, f"loss and accuracy per epoch: {literal(run, 200)}")
        write_png(pixels(figure), self.dirpath / "curves.png")


def _metric(trainer: L.Trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return None if value is None else float(value)
