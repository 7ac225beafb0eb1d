"""Callbacks that steer a run as it goes: the progress bar, early stopping, the weights' moving average, and the
checkpoints (the reports a run writes are in cnn_exp/reports.py).

They reach into Lightning's privates where no public API does the job, each marked "Private:" with its reason;
tests/test_lightning_privates.py fails, naming it, when a Lightning release removes or changes one."""

import importlib
import logging
import math
import os
from pathlib import Path
from time import monotonic
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping as LightningEarlyStopping
from lightning.pytorch.callbacks import EMAWeightAveraging, RichProgressBar
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
from lightning.pytorch.trainer.states import TrainerFn

from cnn_exp import console
from cnn_exp.checkpoints import FILE_KEYS

log = logging.getLogger(__name__)


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
        # Private: no public handle to the metrics shown beside the bar once training ends.
        if self.is_enabled and self._metric_component is not None:
            metrics = self.get_metrics(trainer, pl_module)
            self._metric_component.update({split: text for split, text in metrics.items() if " step" not in split})
        # Private: no public way to end the live bar in the middle of a stage.
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
            # Private, as above: the live bar ends here.
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

    # Private override: the only place the bar's "Epoch N" text is built.
    def _get_train_description(self, current_epoch: int) -> str:
        # Counted from 1: the last of 2 epochs reads Epoch 2/2 (Lightning's own bar reads Epoch 1/1).
        total = self.trainer.max_epochs
        description = f"Epoch {current_epoch + 1}" + (f"/{total}" if total and total > 0 else "")
        return f"{description:{len(self.validation_description)}}"  # as wide as "Validation": no flicker

    def _feed_unfed(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._unfed_batch is not None:
            super().on_train_batch_end(trainer, pl_module, None, None, self._unfed_batch)
            self._unfed_batch = None


class EarlyStopping(LightningEarlyStopping):
    """Lightning's early stopping, which says when it stopped and why: on the console once training has ended, and
    as `stopped` (what metrics.json records)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.best_epoch: int | None = None  # counted from 1, as the progress bar counts

    # Private override: no public hook for when the best score improves.
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


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ModelCheckpoint, with last.ckpt written at every epoch's end, restored state that may name only
    files in its own folder, and a run that was moved, then resumed, finding its files again.

    Lightning 2.6 rewrites last.ckpt only when it saved another checkpoint at that step: with a validation split,
    only when the monitored metric improved. last.ckpt then held the best epoch, not the newest, and a run continued
    from it trained some epochs twice. Here it is rewritten at the end of every epoch (and every validation).
    """

    _key: tuple[tuple, str] | None = None

    @property
    def state_key(self) -> str:
        # Lightning asks for it at every hook call, a dozen times a training step, to name the call for its profiler,
        # and builds it each time from the callback's settings (a dict's repr). Built again only when they change.
        settings = (self.monitor, self.mode, self._every_n_train_steps, self._every_n_epochs, self._train_time_interval)
        if self._key is None or self._key[0] != settings:
            self._key = (settings, super().state_key)
        return self._key[1]

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Lightning decides after every step whether to save by steps or by time (~10 µs); a checkpoint that saves by
        # neither, under automatic optimization, never does there.
        if not (
            self._every_n_train_steps >= 1
            or self._train_time_interval is not None
            or not pl_module.automatic_optimization
        ):
            return
        # Not after an epoch's last batch: Lightning resumes such a state in the next epoch, and the epoch's
        # validation, its epoch-end hooks and last.ckpt, which come after that batch, would never run. The epoch's
        # end saves last.ckpt a moment later instead (signals.StopOnSignal stops only before a last batch, for the
        # same reason).
        if batch_idx + 1 >= trainer.num_training_batches:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # Private: Lightning's choice between epoch end and after validation is not exposed.
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_due(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_due(trainer)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Point the state of a moved run at where its files lie now.

        Its state names files by absolute path. Lightning drops that state when the folder differs, and the resumed
        run would then rank its epochs afresh: test a worse epoch as the best one and write last-v1.ckpt beside a
        stale last.ckpt.
        """
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        before = state.get("dirpath") if state else None
        # Only a checkpoint lying in this callback's own folder continues its run (resume=). One from elsewhere
        # (train.py ckpt_path=) starts a new run, whose ranking starts afresh, as Lightning intends.
        if not before or before == self.dirpath or not trainer.ckpt_path or not self.dirpath:
            return
        if Path(trainer.ckpt_path).resolve().parent != Path(self.dirpath).resolve():
            return

        def here(path: str) -> str:
            return str(Path(self.dirpath, Path(path).relative_to(before))) if path.startswith(before + os.sep) else path

        for key in FILE_KEYS:
            if state.get(key):
                state[key] = here(state[key])
        state["best_k_models"] = {here(path): score for path, score in state.get("best_k_models", {}).items()}
        state["dirpath"] = self.dirpath

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning's restore, keeping only names of files in this callback's folder, links and `..` resolved."""
        ours = state_dict.get("dirpath") == self.dirpath
        super().load_state_dict(state_dict)
        if not ours:
            # Another run's state (train.py ckpt_path=): this run ranks its own files afresh and names no other.
            self.best_model_path = ""
            return
        for key in FILE_KEYS:
            if getattr(self, key) and not self._own(getattr(self, key)):
                log.warning("the checkpoint's %s=%s lies outside %s: dropped", key, getattr(self, key), self.dirpath)
                setattr(self, key, "")
        if self.save_last and not self.last_model_path:  # else Lightning, finding last.ckpt, writes last-v1.ckpt
            self.last_model_path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)
        for path in [path for path in self.best_k_models if not self._own(path)]:
            log.warning("the checkpoint's best_k_models names %s, outside %s: dropped", path, self.dirpath)
            del self.best_k_models[path]
        # Lightning looks the k-th best up among best_k_models: the two must agree, or its next save fails.
        if self.monitor and self.best_k_models:
            ranked = sorted(self.best_k_models, key=lambda path: float(self.best_k_models[path]))
            best, worst = (ranked[0], ranked[-1]) if self.mode == "min" else (ranked[-1], ranked[0])
            if self.kth_best_model_path not in self.best_k_models:
                self.kth_best_model_path, self.kth_value = worst, self.best_k_models[worst]
            if self.best_model_path not in self.best_k_models:
                self.best_model_path, self.best_model_score = best, self.best_k_models[best]
        elif self.monitor:
            self.best_model_path = self.kth_best_model_path = ""
            self.best_model_score = None
            self.kth_value = torch.tensor(torch.inf if self.mode == "min" else -torch.inf)

    # Private override: every deletion goes through it, and no public hook can veto one.
    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        # Lightning checks the folder on the name as written, where `..` or a link can lead out of it.
        if not self._own(filepath):
            log.warning("kept %s: it lies outside %s, so it is not this callback's to delete", filepath, self.dirpath)
            return
        super()._remove_checkpoint(trainer, filepath)

    def _own(self, path: str) -> bool:
        """Whether `path` names an entry of this callback's folder (or below it), once links and `..` are resolved."""
        entry = Path(path)
        if not self.dirpath or entry.name in ("", ".", ".."):
            return False
        return entry.parent.resolve().is_relative_to(Path(self.dirpath).resolve())

    def _save_last_if_due(self, trainer: L.Trainer) -> None:
        # Lightning's skip: not fitting, a sanity check, fast_dev_run, or a checkpoint (last.ckpt with it) written
        # at this very step already.
        # Private: Lightning's skip rule and its 'write last.ckpt' are not public.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


# Run directories started before the reports moved out of this module name them here in .hydra/config.yaml, which a
# resume builds: they still resolve.
_MOVED = {name: "reports" for name in ("UntrainedScores", "ConfusionMatrix", "TestReport", "EpochTable")}
_MOVED["LayerTable"] = "layers"


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(f"cnn_exp.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
