"""The run record: metrics.json in every run directory, what train.py and test.py write and the sweep summary and
resume read.

It holds the run's status, and once finished its metrics; train.py adds progress (epochs, steps), wall time,
the run's key settings and where the run is. It is always valid JSON: a non-finite number (a diverged loss) is
written as null, which Python's json would otherwise write as NaN, a token other JSON readers refuse.
"""

import errno
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from cnn_exp import atomic
from cnn_exp.errors import is_number, plain

NAME = "metrics.json"

# How a run ended, or that it has not: a run killed without a chance to say so stays "running".
RUNNING, FINISHED, FAILED, INTERRUPTED = "running", "finished", "failed", "interrupted"
STATUSES = (RUNNING, FINISHED, FAILED, INTERRUPTED)

# The names under which Classifier logs its epoch metrics, in the order metrics.json lists them. Every module that
# names a metric takes its name from here.
TRAIN_LOSS, TRAIN_ACC = "train/loss", "train/acc"
VAL_LOSS, VAL_ACC = "val/loss", "val/acc"
TEST_LOSS, TEST_ACC = "test/loss", "test/acc"
METRICS = [TRAIN_LOSS, TRAIN_ACC, VAL_LOSS, VAL_ACC, TEST_LOSS, TEST_ACC]
# The metric a run is judged and a sweep ranked by where the config names none (`optimized_metric`; conf/train.yaml
# names the same).
OPTIMIZED = VAL_ACC

# The run's key settings, the values most often swept: their names in metrics.json → the config keys they are read
# from. The run header and TensorBoard's HParams show these too.
KEY_SETTINGS = {
    "seed": "seed",
    "lr": "optimizer.lr",
    "batch_size": "data.batch_size",
    "val_size": "data.val_size",
    "max_epochs": "trainer.max_epochs",
    "precision": "trainer.precision",
    "padding": "model.padding",
}
# The config groups whose choice the record keeps beside them.
GROUPS = ("experiment", "data", "model", "optimizer", "scheduler")


def path(run_dir: str | Path) -> Path:
    return Path(run_dir) / NAME


def write(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Replace the run's record whole: a reader (or a kill mid-write) sees the old one or the new one.

    On a full disk there is no room for the second copy that takes: the record is then rewritten in place, in the
    blocks the old one frees, so that a run the full disk ended still says so.
    """
    text = json.dumps(_finite(record), indent=2, allow_nan=False) + "\n"
    try:
        atomic.write_text(path(run_dir), text)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT) or not path(run_dir).is_file():
            raise
        # Compact, to fit where the old one was; without what the run's start recorded at length (what ran, where it
        # came from) if even that is longer than the old file.
        room = path(run_dir).stat().st_size
        text = json.dumps(_finite(record), separators=(",", ":"), allow_nan=False) + "\n"
        if len(text.encode()) > room:
            short = {key: value for key, value in record.items() if key not in ("what_ran", "provenance", "resumes")}
            text = json.dumps(_finite(short), separators=(",", ":"), allow_nan=False) + "\n"
        with open(path(run_dir), "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def read(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's record, or None where there is none: no file, or one that is not a record (not JSON, not an
    object, no known status, metrics that are not numbers). What it is read for decides whether that is an error.

    A metric that was not a finite number reads as null (None).
    """
    if not path(run_dir).is_file():  # a FIFO or device would block the read, or never end it
        return None
    try:
        record = json.loads(path(run_dir).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return record if _is_record(record) else None


def digest(file: str | Path) -> str | None:
    """The SHA-256 of a file the run wrote (its config.yaml), kept in the record so that an edit of it is noticed."""
    try:
        return hashlib.sha256(Path(file).read_bytes()).hexdigest() if Path(file).is_file() else None
    except OSError:
        return None


def _is_record(record: Any) -> bool:
    """The parts that readers use have the types they expect."""
    if not isinstance(record, dict) or record.get("status") not in STATUSES:
        return False
    metrics, settings, error = record.get("metrics", {}), record.get("settings", {}), record.get("error", "")
    overrides = settings.get("overrides", []) if isinstance(settings, dict) else None
    return (
        isinstance(metrics, dict)
        and all(value is None or is_number(value) for value in metrics.values())
        and isinstance(settings, dict)
        and isinstance(overrides, list)
        and all(isinstance(override, str) for override in overrides)
        and isinstance(error, str)
    )


def key_settings(cfg: DictConfig) -> dict[str, Any]:
    """The key settings' values in `cfg` as plain values, None where it has none. model.padding is one int for
    every conv layer or a list with one per layer: a list, not the config's ListConfig."""
    values = {}
    for name, key in KEY_SETTINGS.items():
        value = OmegaConf.select(cfg, key)
        values[name] = plain(value)
    return values


def settings(cfg: DictConfig) -> dict[str, Any]:
    """The run's key settings, kept in its record: the config groups chosen, the key settings' values and the
    overrides given. Precision as text (`32-true`, `bf16-mixed`, also a `32` given as a number): resume compares it
    with cnn_exp/precision.py's names."""
    hydra = HydraConfig.get()
    values = key_settings(cfg)
    return {
        **{group: hydra.runtime.choices.get(group) for group in GROUPS},
        **values,
        "precision": str(values["precision"]),
        "overrides": list(hydra.overrides.task),
    }


def _finite(value: Any) -> Any:
    """`value` with every non-finite float, however deeply nested, turned into None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
