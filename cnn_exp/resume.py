"""Continuing a run that stopped: `resume=<run dir>` (in that run, with its own config) and `ckpt_path=<file>`
(a checkpoint's training, in a new run).

This module decides where a resumed run writes, which config and checkpoint it continues from, and which
checkpoints can be continued at all. The rest of resuming lives with what it restores, and must stay there:
- checkpoints.py: the ModelCheckpoint callback that finds its files again when a run was moved, then resumed;
  conf/callbacks/step_checkpoint.yaml: the mid-epoch step.ckpt a killed run continues from;
- classifier.py: the Classifier saves and restores torch's random state and its epoch sums (on_save_checkpoint,
  on_load_checkpoint), so dropout, augmentation and epoch means go on as if never stopped;
- data.py: the MNISTDataModule saves its position in the epoch (state_dict) and serves the rest of that epoch.
"""

import os
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from cnn_exp import checkpoints, precision, record, rundir
from cnn_exp.errors import UserError


def resumable(resume: str | None) -> bool:
    """Whether resume= names a run of train.py that has not finished: only then may Hydra write into it."""
    if not resume:
        return False
    saved = record.read(resume)
    return saved is not None and saved["status"] != record.FINISHED


def _run_dir(resume: str | None, new: str) -> str:
    """hydra.run.dir: the run named by resume=<run dir> when it can be resumed, else a new one: a wrong resume= then
    fails in a new run directory instead of writing Hydra's files into the directory it names. A SLURM job's run
    is named for the job, so that when SLURM requeues it (same job id) it finds its own run again and continues."""
    if resumable(resume):
        return str(resume)
    job = rundir.slurm_job()
    return str(Path(new).parent / f"slurm-{job}") if job else new


_subdirs: dict[str, str] = {}


def _hydra_subdir(output_dir: str, time: str) -> str:
    """hydra.output_subdir, where Hydra records the config: `.hydra` for a new run; in a directory that already holds
    a run (a resume, a requeued job, a refused start), `.hydra/resumed-<time>`, so how the run was started is kept.

    Resolved once a run, just before Hydra writes there: the directory's lock is taken now (cnn_exp/rundir.py).
    Another process working there gets a record of its own and is refused when its task starts."""
    if output_dir not in _subdirs:
        if rank_zero_only.rank != 0:  # another rank of a DDP run, in rank zero's directory
            _subdirs[output_dir] = f".hydra/rank-{rank_zero_only.rank}"
        elif not rundir.claim(output_dir):
            _subdirs[output_dir] = f".hydra/refused-{time}-{os.getpid()}"
        elif rundir.holds_a_run(output_dir):
            _subdirs[output_dir] = f".hydra/resumed-{time}"
        else:
            _subdirs[output_dir] = ".hydra"
    return _subdirs[output_dir]


# conf/hydra/default.yaml uses these two to choose the run directory. They are registered here, on import, because
# Hydra resolves hydra.run.dir before it calls train(): train.py imports cnn_exp.run, which imports this module,
# before @hydra.main composes the config.
OmegaConf.register_new_resolver("run_dir", _run_dir, replace=True)
OmegaConf.register_new_resolver("hydra_subdir", _hydra_subdir, replace=True)


def resumed_run(cfg: DictConfig, requeued: bool = False) -> tuple[DictConfig, dict[str, Any]]:
    """The config and settings of the run `resume=` names, pointed at its newest checkpoint and where it lies now.

    `requeued`: a scheduler started the same command again in the run's own directory (a requeued SLURM job),
    which continues the run there as if resumed.
    """
    run_dir = Path(cfg.paths.output_dir if requeued else cfg.resume)
    named = f"hydra.run.dir={run_dir}" if requeued else f"resume={cfg.resume}"
    try:
        # Hydra's record of the composed config keeps its interpolations: resolved now, its paths name the run
        # directory where it lies now (moved or copied since), and paths.* overrides reach every use.
        saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    except FileNotFoundError:
        saved = None
    saved_record = record.read(run_dir)
    if saved is None or saved_record is None or not isinstance(saved_record.get("settings"), dict):
        raise UserError(f"{named}: not a run directory of train.py (no .hydra/config.yaml or metrics.json)")
    # Refused before anything is written: its metrics.json holds the run's results.
    if saved_record["status"] == record.FINISHED:
        raise UserError(
            f"{named}: this run already finished, there is nothing to continue. Test a checkpoint of it "
            "with test.py ckpt_path=..., or train it on in a new run: "
            f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'} trainer.max_epochs=N"
        )
    candidates = [run_dir / "checkpoints" / name for name in ("step.ckpt", "last.ckpt")]
    candidates = [path for path in candidates if path.is_file()]
    if not candidates:
        raise UserError(f"{named}: no step.ckpt or last.ckpt in {run_dir / 'checkpoints'} to continue from")
    # Only where the data is may differ (another machine); anything else would silently not apply.
    given = list(HydraConfig.get().overrides.task)
    if requeued and given != list(OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")):
        raise UserError(
            f"{run_dir} holds an unfinished run of another command: continue it with resume={run_dir}, or choose "
            "another hydra.run.dir"
        )
    if requeued:
        given = []
    if extra := [o for o in given if not o.startswith(("resume=", "hydra.", "paths.data_dir=", "paths.data_mirror="))]:
        raise UserError(
            f"resume= continues a run with its own config and takes no other settings ({' '.join(extra)}). "
            "To change them, start a new run from its checkpoint: ckpt_path=<run>/checkpoints/last.ckpt"
        )
    for key in ("data_dir", "data_mirror"):
        if any(o.startswith(f"paths.{key}=") for o in given):
            saved.paths[key] = cfg.paths[key]
    # The precision chosen on the machine the run started on: a requeued job that lands on another kind of node
    # continues with the same arithmetic. Taken from the record only if it is one auto_precision could have chosen.
    started = saved_record["settings"].get("precision")
    chosen = "auto_precision" in str(OmegaConf.to_container(saved.trainer, resolve=False).get("precision"))
    if chosen and started in (precision.BF16, precision.FP32):
        saved.trainer.precision = started
    saved_record["settings"]["precision"] = str(saved.trainer.precision)
    saved.ckpt_path = str(max(candidates, key=lambda path: path.stat().st_mtime))
    saved.resume = str(run_dir)
    # Lightning's CSV logger empties a metrics.csv it finds: the resumed part goes beside it instead.
    for node in (saved.get("logger") or {}).values():
        if node and str(node.get("_target_", "")).endswith("CSVLogger"):
            node.version = f"{node.get('version') or ''}resumed-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    return saved, saved_record["settings"]


def training_state(path: str, max_epochs: int | None, resume: str | None = None) -> dict[str, Any]:
    """The checkpoint `ckpt_path` names, refused unless it holds a training state of train.py's to continue."""
    checkpoint = checkpoints.load(path)
    if not isinstance(checkpoint, dict) or not {"state_dict", "hyper_parameters", "global_step"} <= set(checkpoint):
        raise UserError(
            f"ckpt_path={path} is not a checkpoint written by train.py (a bare state_dict or another program's "
            "file has no training state to continue from)"
        )
    # Past max_epochs Lightning fails with a traceback; at it, it would train nothing (caught after fit).
    if max_epochs is not None and 0 <= max_epochs <= checkpoint.get("epoch", 0):
        raise UserError(nothing_left_message(path, max_epochs, resume))
    return checkpoint


def nothing_left_message(path: str, max_epochs: int, resume: str | None) -> str:
    """The message for a checkpoint whose training has already ended: what to run instead."""
    if resume:  # a run killed after its training had ended, in its final test
        return (
            f"resume={resume}: its training had already ended when it stopped, there is nothing left to train. "
            f"Test its checkpoint with test.py ckpt_path={path}"
        )
    return (
        f"ckpt_path={path} has already trained to trainer.max_epochs={max_epochs}: nothing left to train. "
        "Give a larger trainer.max_epochs, or test it with test.py."
    )
