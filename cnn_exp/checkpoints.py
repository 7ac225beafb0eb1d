"""Checkpoint files: written atomically, read without ever running code stored in them, found again after a move."""

import os
import pickle
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import callbacks

from cnn_exp import atomic
from cnn_exp.errors import UserError


def load(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """torch.load with `weights_only=True`: tensors and plain values only, so a crafted file cannot run code.

    Every way a user's file can be wrong ends in one UserError naming the file: missing, damaged, or carrying
    objects that only an unsafe load would build.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ckpt_path={path}: no such file (give the path of a .ckpt written by train.py)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err) or "GLOBAL" in str(err):
            raise UserError(
                f"ckpt_path={path} refused: it holds Python objects that loading would have to build by running "
                "code, which a checkpoint written by train.py never does. Do not load it unless you trust its "
                "source (and then not with this tool)."
            ) from None
        raise UserError(f"ckpt_path={path} cannot be read: it is not a checkpoint, or it is damaged") from None
    except Exception as err:  # torch's safe unpickler fails on junk in many ways (KeyError, IndexError, ...)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"ckpt_path={path} cannot be read (truncated or damaged?): {reason}") from None


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O, made atomic where it counts and safe to load.

    Lightning writes through a temporary file in the system's temp folder and moves it into place: a copy, not
    a rename, when outputs/ lives on another filesystem (a cluster's shared disk), so a kill can still leave half
    a file. Here the temporary file sits beside the target and is renamed over it after an fsync.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        with atomic.replace(path, "wb") as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> Any:
        return load(path, map_location=map_location or "cpu")


class ModelCheckpoint(callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint that finds its files again when the run they belong to was moved, then resumed.

    Its state names files by absolute path. Lightning drops that state when the folder differs, and the resumed
    run would then rank its epochs afresh: test a worse epoch as the best one and write last-v1.ckpt beside a
    stale last.ckpt.
    """

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
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

        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            if state.get(key):
                state[key] = here(state[key])
        state["best_k_models"] = {here(path): score for path, score in state.get("best_k_models", {}).items()}
        state["dirpath"] = self.dirpath
