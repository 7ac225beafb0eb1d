"""Callbacks that tests add to real runs (`+callbacks.<name>._target_=tests.callbacks.<Class>`)."""

import hashlib
import json
import os
import signal
from pathlib import Path

import lightning as L
import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class ShardRecorder(L.Callback):
    """Each rank writes down which training images it was served in the first epoch (the DDP test)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.seen: list[str] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: tuple, batch_idx: int
    ) -> None:
        if trainer.current_epoch == 0:
            images: torch.Tensor = batch[0]
            self.seen += [hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in images]

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))


class SignalAt(L.Callback):
    """Sends its own process a real signal (SIGKILL, SIGINT for Ctrl-C) when training reaches `step`.

    Only in a run started afresh: resuming reloads the run's config, this callback included, and must get past it.
    """

    def __init__(self, step: int, signal: str = "SIGKILL") -> None:
        self.step, self.signal = step, signal

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: tuple, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step and trainer.ckpt_path is None:
            if self.signal == "SIGINT" and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
                # As in a terminal: a test runner started in the background hands its children SIGINT ignored,
                # and Python then installs no KeyboardInterrupt handler.
                signal.signal(signal.SIGINT, signal.default_int_handler)
            os.kill(os.getpid(), getattr(signal, self.signal))


class SignalInValidation(L.Callback):
    """Sends its own process a real signal in the validation after training step `step` (an epoch's end), in a run
    started afresh."""

    def __init__(self, step: int, signal: str = "SIGKILL") -> None:
        self.step, self.signal = step, signal

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_step == self.step and trainer.ckpt_path is None and not trainer.sanity_checking:
            os.kill(os.getpid(), getattr(signal, self.signal))


class SignalInTest(L.Callback):
    """Sends its own process a real signal when the final test starts (training has ended, the test has not), once:
    the file `once` marks that it did, so the resumed run gets past it."""

    def __init__(self, once: str, signal: str = "SIGKILL") -> None:
        self.once, self.signal = Path(once), signal

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if not self.once.exists():
            self.once.touch()
            os.kill(os.getpid(), getattr(signal, self.signal))


class SignalAfterTest(L.Callback):
    """Sends its own process a real signal once the final test's last batch is done (while its report is drawn)."""

    def __init__(self, signal: str = "SIGTERM") -> None:
        self.signal = signal

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        os.kill(os.getpid(), getattr(signal, self.signal))


class SignalAfterFirstJob(Callback):
    """Hydra callback (`+hydra.callbacks.<name>._target_=...`): sends its own process a real signal `times` times as
    a sweep's first job ends, between it and the next."""

    def __init__(self, signal: str = "SIGTERM", times: int = 1) -> None:
        self.signal, self.times = signal, times

    def on_job_end(self, config: DictConfig, job_return: object, **kwargs: object) -> None:
        if config.hydra.job.num == 0:
            for _ in range(self.times):
                os.kill(os.getpid(), getattr(signal, self.signal))


class BlowUpWeights(L.Callback):
    """Makes the last training step leave weights that are not finite, as a diverging last step does."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_step == trainer.max_epochs * trainer.num_training_batches:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("inf"))


class SignalAtStart(L.Callback):
    """Sends its own process a real signal while the run starts (its data being set up, before any step), once:
    the file `once` marks that it did, so the run started again gets past it."""

    def __init__(self, once: str, signal: str = "SIGTERM") -> None:
        self.once, self.signal = Path(once), signal

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.once.exists():
            self.once.touch()
            os.kill(os.getpid(), getattr(signal, self.signal))


class FillDisk(L.Callback):
    """Fills the disk that `path` lies on, as another program would, when training reaches `step`: a file of zeros
    grows until the disk refuses more. Once: the file `once` marks that it did."""

    def __init__(self, path: str, step: int, once: str, leave: int = 0) -> None:
        self.path, self.step, self.once, self.leave = Path(path), step, Path(once), leave

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: tuple, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step and not self.once.exists():
            self.once.touch()
            with open(self.path, "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(bytes(4096))
                except OSError:
                    pass
                f.truncate(max(0, f.tell() - self.leave))  # `leave` bytes free: a write fails part-way
