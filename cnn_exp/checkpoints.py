"""Checkpoint files: written atomically, and read without ever running code stored in them."""

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

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
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"ckpt_path={path} cannot be read (truncated or damaged?): {reason}") from None


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O, made atomic where it counts and safe to load.

    Lightning writes through a temporary file in the system's temp folder and moves it into place: a copy, not
    a rename, when outputs/ lives on another filesystem (a cluster's shared disk), so a kill can still leave half
    a file. Here the temporary file sits beside the target and is renamed over it after an fsync.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> Any:
        return load(path, map_location=map_location or "cpu")
