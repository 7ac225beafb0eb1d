"""Lookahead (Zhang et al., 2019) around whatever optimizer the run trains with, as a callback."""

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from cnn_exp.errors import UserError, is_number, is_whole


class Lookahead(Callback):
    """Keeps a slow copy of the weights; every `every` optimizer steps, and at each epoch's end, the slow copy moves
    `alpha` of the way to the trained (fast) weights, and training continues from it.

    The optimizer explores for `every` steps, the slow weights keep a share of where it went: a smoother path, which
    airbench found to help most with a fast batch-norm momentum (model.bn_momentum). The slow weights are saved in
    every checkpoint, so a resumed run continues as if never stopped. torch and Lightning offer no Lookahead.
    """

    def __init__(self, every: int = 5, alpha: float = 0.5) -> None:
        if not is_whole(every) or every < 1:
            raise UserError(f"callbacks.lookahead.every={every} must be a whole number of optimizer steps, 1 or more")
        if not is_number(alpha) or not 0 < alpha <= 1:
            raise UserError(f"callbacks.lookahead.alpha={alpha} must be above 0 and at most 1")
        self.every, self.alpha = every, alpha
        self.slow: list[torch.Tensor] | None = None
        self.synced_at = -1  # the global step of the last sync

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.slow is None:  # a run from its beginning (a resumed one has them from its checkpoint)
            self.slow = [p.detach().clone() for p in pl_module.parameters()]
            return
        shapes = [tuple(p.shape) for p in pl_module.parameters()]
        if [tuple(s.shape) for s in self.slow] != shapes:
            raise UserError("the checkpoint's Lookahead weights do not fit this run's network")
        self.slow = [s.to(p.device, p.dtype) for s, p in zip(self.slow, pl_module.parameters(), strict=True)]

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every == 0:
            self._sync(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(trainer, pl_module)

    @torch.no_grad()
    def _sync(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Once per optimizer step: with gradient accumulation several batches end at one step.
        if self.slow is None or trainer.global_step == self.synced_at:
            return
        self.synced_at = trainer.global_step
        for parameter, slow in zip(pl_module.parameters(), self.slow, strict=True):
            slow.lerp_(parameter, self.alpha)
            parameter.copy_(slow)

    def state_dict(self) -> dict[str, Any]:
        return {"slow": self.slow, "synced_at": self.synced_at}

    @staticmethod
    def check_state(state: Any) -> None:
        """Refuse a checkpoint's Lookahead state that is not slow weights and the step they were synced at."""
        if not isinstance(state, Mapping):
            raise UserError("the checkpoint's Lookahead state is not a mapping (slow, synced_at)")
        slow, synced_at = state.get("slow"), state.get("synced_at", -1)
        if slow is not None and not (isinstance(slow, list) and all(isinstance(t, torch.Tensor) for t in slow)):
            raise UserError("the checkpoint's Lookahead state holds no slow weights (a list of tensors)")
        if not is_whole(synced_at) or synced_at < -1:
            raise UserError(f"the checkpoint's Lookahead state: synced_at={synced_at!r} is not a step")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.check_state(state_dict)
        self.slow, self.synced_at = state_dict.get("slow"), int(state_dict.get("synced_at", -1))
