"""A callback for the DDP test: each rank writes down which training images it was served in the first epoch."""

import hashlib
import json
from pathlib import Path

import lightning as L
import torch


class ShardRecorder(L.Callback):
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
