"""A callback that writes when training reached its first step and how long each epoch took, for compare.py."""

import itertools
import json
import time
from pathlib import Path

import lightning as L


class EpochTimer(L.Callback):
    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.first_step: float | None = None
        self.starts: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, i: int) -> None:
        if self.first_step is None:
            self.first_step = time.time()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # An epoch runs from its start to the next one's, so its checkpoint and logging count too.
        bounds = [*self.starts, time.perf_counter()]
        epochs = [b - a for a, b in itertools.pairwise(bounds)]
        device = str(trainer.datamodule.train_set.tensors[0].device)  # where the images were held
        self.path.write_text(json.dumps({"first_step": self.first_step, "epochs": epochs, "data_device": device}))
