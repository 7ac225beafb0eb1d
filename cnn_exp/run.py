"""What train.py and test.py run: build what the config describes, fit or test it, write metrics.json."""

import functools
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import rich
import rich.syntax
import rich.tree
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Checkpoint, LearningRateMonitor, ModelSummary, ProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from cnn_exp import atomic, checkpoints
from cnn_exp.classifier import Classifier
from cnn_exp.data import MNISTDataModule
from cnn_exp.errors import UserError, is_whole

log = logging.getLogger(__name__)

# The names under which Classifier logs its epoch metrics, in the order metrics.json lists them.
METRICS = [f"{split}/{name}" for split in ("train", "val", "test") for name in ("loss", "acc")]


def _resumable(resume: str | None) -> bool:
    """Whether resume= names a run of train.py that has not finished: only then may Hydra write into it."""
    try:
        return bool(resume) and json.loads((Path(resume) / "metrics.json").read_text()).get("status") != "finished"
    except (OSError, ValueError, AttributeError):
        return False


# hydra.run.dir: the run named by resume=<run dir> when it can be resumed, else a new one: a wrong resume= then fails
# in a new run directory instead of writing Hydra's files into the directory it names.
OmegaConf.register_new_resolver("run_dir", lambda resume, new: resume if _resumable(resume) else new, replace=True)
# hydra.output_subdir: a resumed run keeps the .hydra/ record of how it was started, and adds one of each resume.
OmegaConf.register_new_resolver(
    "hydra_subdir", lambda resume, time: f".hydra/resumed-{time}" if _resumable(resume) else ".hydra", replace=True
)

# Batches are slices of in-memory tensors: worker processes would only add copies.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
# MNISTDataModule resumes mid-epoch itself (its state_dict), so Lightning's loader-level warning does not apply.
warnings.filterwarnings("ignore", ".*ended before the epoch ended and your dataloader is not resumable.*")
# With data.val_size=0 there is deliberately no validation set.
warnings.filterwarnings("ignore", ".*Total length of `list` across ranks is zero.*")
# Lightning 2.6 calls a torch API that torch 2.14 deprecates; nothing for a user to act on.
warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
# TensorBoard draws the model graph from a torch.jit trace, which torch 2.14 deprecates; there is no other way yet.
warnings.filterwarnings("ignore", ".*torch.jit.trace.* is deprecated.*", FutureWarning)
# Lightning advertises its cloud logger at every start.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: "litlogger" not in record.getMessage()
)


def reports_user_errors(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Turn a UserError, however deeply wrapped (Hydra wraps errors raised while instantiating), into one message.

    A single run exits with status 1 and the message alone. In a sweep a failed job must not stop the others:
    its traceback goes to its log, metrics.json records it as failed, and the sweep summary (cnn_exp/sweep.py)
    lists it and makes the sweep exit with status 1.
    """

    @functools.wraps(task)
    def wrapper(cfg: DictConfig) -> Any:
        try:
            return task(cfg)
        except Exception as err:
            if HydraConfig.get().mode == RunMode.MULTIRUN:
                log.exception("job failed: %s", _error_text(err))
                metrics = Path(cfg.paths.output_dir) / "metrics.json"
                if not metrics.exists():  # it failed before training started
                    write_json(metrics, {"status": "failed", "error": _error_text(err)})
                return None
            cause = _user_error(err)
            if cause is None:
                raise
            sys.exit(f"error: {cause}")

    return wrapper


def _error_text(err: BaseException) -> str:
    """What metrics.json and the sweep summary say of an error: a UserError's message, else type and message."""
    cause = _user_error(err)
    return str(cause) if cause else f"{type(err).__name__}: {err}".strip()


def _user_error(err: BaseException) -> UserError | None:
    """The UserError behind `err`, if any: Hydra and Lightning wrap errors raised inside what they call."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, UserError):
        cause = cause.__cause__
    return cause


@reports_user_errors
def train(cfg: DictConfig) -> float | None:
    """Fit the configured model, test it unless `test=false`, and write metrics.json; return `optimized_metric`.

    metrics.json is written when training starts (status running) and again however the run ends: finished,
    failed (with the error) or interrupted (Ctrl-C). Only a finished run reports metrics. With `resume=<run dir>`
    the run continues in that directory, with its config, from its newest checkpoint.
    """
    start = time.perf_counter()
    output_dir = Path(cfg.paths.output_dir)
    cfg, settings = _resume(cfg) if cfg.get("resume") else (cfg, _settings(cfg))
    # A missing, damaged, unsafe or foreign file fails now, before any work.
    start_step = (
        _training_state(cfg.ckpt_path, cfg.trainer.max_epochs, cfg.get("resume"))["global_step"] if cfg.ckpt_path else 0
    )
    _check_monitored_metrics(cfg)
    _check_run_settings(cfg)
    print_config(cfg, output_dir / "config.yaml")
    _set_threads(cfg.get("threads"))
    L.seed_everything(cfg.seed, workers=True)

    # The model first: a network that cannot be built fails before any data is read.
    model = Classifier(net=_plain(cfg.model), optimizer=_plain(cfg.optimizer), scheduler=_plain(cfg.scheduler))
    datamodule: MNISTDataModule = instantiate(cfg.data, _convert_="all")
    if cfg.ckpt_path:  # before anything is recorded: a refused resume= leaves its run's record as it was
        checkpoints.check_training_state(checkpoints.load(cfg.ckpt_path), cfg.ckpt_path, model, datamodule)
    loggers = _instantiate_each(cfg.get("logger"), "logger")
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=_callbacks(cfg, loggers), logger=loggers or False)
    settings["parameters"] = sum(p.numel() for p in model.net.parameters())
    settings["threads"] = torch.get_num_threads()

    def record(result: dict[str, Any]) -> None:
        if trainer.is_global_zero:  # under DDP every rank runs this function; one writes the results
            progress = {"epochs": trainer.current_epoch, "steps": trainer.global_step}
            elapsed = round(time.perf_counter() - start, 2)
            write_json(
                output_dir / "metrics.json",
                {**result, **progress, "wall_time_s": elapsed, "settings": settings, "run_dir": str(output_dir)},
            )

    record({"status": "running"})
    # Unless training finishes or fails, it was interrupted: Lightning turns Ctrl-C into SystemExit.
    result: dict[str, Any] = {"status": "interrupted"}
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        if cfg.ckpt_path and trainer.global_step == start_step and not trainer.interrupted:
            raise UserError(_nothing_left(cfg.ckpt_path, cfg.trainer.max_epochs, cfg.get("resume")))
        metrics = _epoch_metrics(trainer)
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint and checkpoint.monitor else ""
        if cfg.test:
            # The best checkpoint on val/acc when there is one; else the weights training ended with.
            trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
            metrics |= _epoch_metrics(trainer)
        _log_hparams(trainer, settings, metrics)
        result = {
            "status": "finished",
            "metrics": metrics,
            "best": {"val/acc": float(checkpoint.best_model_score), "checkpoint": best} if best else None,
            "tested": (best or "final weights") if cfg.test else None,
        }
    except Exception as err:
        result = {"status": "failed", "error": _error_text(err)}
        raise
    finally:
        record(result)
    return result["metrics"].get(cfg.get("optimized_metric"))


def _log_hparams(trainer: L.Trainer, settings: dict[str, Any], metrics: dict[str, float]) -> None:
    """TensorBoard's HParams tab: the run's settings and command-line values beside its final metrics.

    The metrics go under hparams/ tags, written once: the train/val/test curves keep only what training logged.
    """
    params = {key: value for key, value in settings.items() if key != "overrides" and value is not None}
    for override in settings["overrides"]:
        key, _, value = override.lstrip("+~").partition("=")
        if value and not key.startswith(("paths.", "hydra.")):
            params.setdefault(key, value)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params, {f"hparams/{name}": value for name, value in metrics.items()})


def _set_threads(threads: int | None) -> None:
    """Give each job its share of the cores when a parallel launcher runs several at once, so they do not fight.

    `threads=N` sets it; by default a job under the joblib launcher gets cores ÷ parallel jobs, any other run
    keeps torch's default (all cores).
    """
    if threads is None and HydraConfig.get().mode == RunMode.MULTIRUN:
        launcher = HydraConfig.get().launcher
        if "Joblib" in launcher.get("_target_", ""):
            cores = os.cpu_count() or 1
            jobs = launcher.n_jobs if launcher.n_jobs > 0 else cores + 1 + launcher.n_jobs  # joblib's -1 = all
            threads = max(1, cores // max(1, jobs))
    if threads is not None:
        torch.set_num_threads(threads)


def _settings(cfg: DictConfig) -> dict[str, Any]:
    """The run's key settings, for metrics.json: the config groups chosen and the values most often swept."""
    hydra = HydraConfig.get()
    return {
        **{
            group: hydra.runtime.choices.get(group)
            for group in ("experiment", "data", "model", "optimizer", "scheduler")
        },
        "seed": cfg.seed,
        "lr": cfg.optimizer.lr,
        "batch_size": cfg.data.batch_size,
        "val_size": cfg.data.val_size,
        "max_epochs": cfg.trainer.max_epochs,
        "padding": _plain(cfg.model.padding),
        "overrides": list(hydra.overrides.task),
    }


def _training_state(path: str, max_epochs: int | None, resume: str | None = None) -> dict[str, Any]:
    """The checkpoint `ckpt_path` names, refused unless it holds a training state of train.py's to continue."""
    checkpoint = checkpoints.load(path)
    if not isinstance(checkpoint, dict) or not {"state_dict", "hyper_parameters", "global_step"} <= set(checkpoint):
        raise UserError(
            f"ckpt_path={path} is not a checkpoint written by train.py (a bare state_dict or another program's "
            "file has no training state to continue from)"
        )
    # Past max_epochs Lightning fails with a traceback; at it, it would train nothing (caught after fit).
    if max_epochs is not None and 0 <= max_epochs <= checkpoint.get("epoch", 0):
        raise UserError(_nothing_left(path, max_epochs, resume))
    return checkpoint


def _nothing_left(path: str, max_epochs: int, resume: str | None) -> str:
    if resume:  # a run killed after its training had ended, in its final test
        return (
            f"resume={resume}: its training had already ended when it stopped, there is nothing left to train. "
            f"Test its checkpoint with test.py ckpt_path={path}"
        )
    return (
        f"ckpt_path={path} has already trained to trainer.max_epochs={max_epochs}: nothing left to train. "
        "Give a larger trainer.max_epochs, or test it with test.py."
    )


def _check_monitored_metrics(cfg: DictConfig) -> None:
    """Early stopping on a validation metric needs a validation split; without one Lightning fails after epoch 1."""
    for key, node in (cfg.callbacks or {}).items():
        monitor = str((node or {}).get("monitor") or "")
        if cfg.data.val_size == 0 and monitor.startswith("val/") and "EarlyStopping" in str(node.get("_target_")):
            raise UserError(
                f"callbacks.{key} stops on {monitor}, but data.val_size=0 leaves no validation split: "
                "set data.val_size (e.g. 5000) or drop the callback"
            )


def _check_run_settings(cfg: DictConfig) -> None:
    """seed and threads, which torch and numpy would otherwise refuse with a traceback."""
    seed, threads = cfg.seed, cfg.get("threads")
    if not is_whole(seed) or not 0 <= seed < 2**32:
        raise UserError(f"seed={seed} must be a whole number from 0 to {2**32 - 1}")
    if threads is not None and (not is_whole(threads) or threads < 1):
        raise UserError(f"threads={threads} must be a number of CPU threads (1 or more), or null for the default")


def _resume(cfg: DictConfig) -> tuple[DictConfig, dict[str, Any]]:
    """A run directory's own config and settings, pointed at its newest checkpoint and at where it lies now."""
    run_dir = Path(cfg.resume)
    try:
        # Hydra's record of the composed config keeps its interpolations: resolved now, its paths name the run
        # directory where it lies now (moved or copied since), and paths.* overrides reach every use.
        saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        record = json.loads((run_dir / "metrics.json").read_text())
        settings = record["settings"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        raise UserError(
            f"resume={cfg.resume}: not a run directory of train.py (no .hydra/config.yaml or metrics.json)"
        ) from None
    # Refused before anything is written: its metrics.json holds the run's results.
    if record.get("status") == "finished":
        raise UserError(
            f"resume={cfg.resume}: this run already finished, there is nothing to continue. Test a checkpoint of it "
            "with test.py ckpt_path=..., or train it on in a new run: "
            f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'} trainer.max_epochs=N"
        )
    candidates = [run_dir / "checkpoints" / name for name in ("step.ckpt", "last.ckpt")]
    candidates = [path for path in candidates if path.is_file()]
    if not candidates:
        raise UserError(f"resume={cfg.resume}: no step.ckpt or last.ckpt in {run_dir / 'checkpoints'} to continue from")
    # Only where the data is may differ (another machine); anything else would silently not apply.
    given = list(HydraConfig.get().overrides.task)
    if extra := [o for o in given if not o.startswith(("resume=", "hydra.", "paths.data_dir=", "paths.data_mirror="))]:
        raise UserError(
            f"resume= continues a run with its own config and takes no other settings ({' '.join(extra)}). "
            "To change them, start a new run from its checkpoint: ckpt_path=<run>/checkpoints/last.ckpt"
        )
    for key in ("data_dir", "data_mirror"):
        if any(o.startswith(f"paths.{key}=") for o in given):
            saved.paths[key] = cfg.paths[key]
    saved.ckpt_path = str(max(candidates, key=lambda path: path.stat().st_mtime))
    saved.resume = cfg.resume
    # Lightning's CSV logger empties a metrics.csv it finds: the resumed part goes beside it instead.
    for node in (saved.get("logger") or {}).values():
        if node and str(node.get("_target_", "")).endswith("CSVLogger"):
            node.version = f"{node.get('version') or ''}resumed-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    return saved, settings


@reports_user_errors
def test(cfg: DictConfig) -> float:
    """Rebuild model and data from a checkpoint alone, test on the official test split, write metrics.json."""
    start = time.perf_counter()
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise UserError("test.py needs ckpt_path=<file>.ckpt, e.g. outputs/train/runs/<run>/checkpoints/last.ckpt")
    # Settings that only train.py takes would be ignored here without a word (Hydra suggests +key= for them).
    if ignored := [group for group in ("model", "data", "optimizer", "scheduler", "experiment") if group in cfg]:
        raise UserError(
            f"test.py rebuilds network and data from the checkpoint: {', '.join(ignored)} settings cannot change "
            "them (batch_size=N sets the test batch size, paths.* where the data is)"
        )
    path = Path(cfg.ckpt_path)
    checkpoints.load(path)  # refuses a missing, damaged or unsafe file with one clear message
    # Data lives where this machine keeps it, not where the checkpoint was trained.
    data_overrides = {"data_dir": cfg.paths.data_dir, "mirror": cfg.paths.data_mirror}
    if cfg.batch_size:
        data_overrides["batch_size"] = cfg.batch_size
    try:
        model = Classifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
        datamodule = MNISTDataModule.load_from_checkpoint(path, map_location="cpu", weights_only=True, **data_overrides)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"ckpt_path={path} is not a checkpoint written by train.py: {reason}") from None

    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=_callbacks(cfg, loggers=[]))
    trainer.test(model, datamodule=datamodule)
    metrics = _epoch_metrics(trainer)
    log.info("test/acc %.4f  test/loss %.4f", metrics["test/acc"], metrics["test/loss"])
    write_json(
        Path(cfg.paths.output_dir) / "metrics.json",
        {
            "status": "finished",
            "metrics": metrics,
            "tested": str(path),
            "wall_time_s": round(time.perf_counter() - start, 2),
            "settings": {"data": dict(datamodule.hparams), "model": dict(model.hparams)},
            "run_dir": cfg.paths.output_dir,
        },
    )
    return metrics["test/acc"]


@rank_zero_only
def print_config(cfg: DictConfig, save_to: Path) -> None:
    """Print the composed config as a tree, one branch per group, and save it resolved with the run."""
    tree = rich.tree.Tree("config", guide_style="dim")
    for key, node in cfg.items():
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else f"{node}\n"
        tree.add(str(key)).add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    save_to.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, save_to, resolve=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically: a reader (or a kill mid-write) sees the old file or the new one, never half of one."""
    atomic.write_text(path, json.dumps(data, indent=2) + "\n")


def _epoch_metrics(trainer: L.Trainer) -> dict[str, float]:
    return {name: float(trainer.callback_metrics[name]) for name in METRICS if name in trainer.callback_metrics}


def _instantiate_each(group: DictConfig | None, name: str) -> list[Any]:
    """Build every entry of a group that holds several objects by name (callbacks, loggers)."""
    for key, node in (group or {}).items():
        # An entry with settings but no class: an experiment tunes an object that the group chosen (e.g.
        # callbacks=none) does not define. Instantiated, it would reach Lightning as a dict and fail deep inside.
        if node and "_target_" not in node:
            raise UserError(
                f"{name}.{key} sets {', '.join(map(str, node))} but names no _target_: the {name} config chosen "
                f"does not define {key}. Drop it with ~{name}.{key}, or choose a {name} config that has it."
            )
    return [instantiate(node) for node in (group or {}).values() if node]


# Lightning's switches for its own defaults turn ours off too (Lightning would refuse the pair with a traceback).
SWITCHES = {
    "enable_progress_bar": ProgressBar,
    "enable_checkpointing": Checkpoint,
    "enable_model_summary": ModelSummary,
}


def _callbacks(cfg: DictConfig, loggers: list[Any]) -> list[Any]:
    """The configured callbacks, less those that `trainer.enable_*=false` or a run without loggers turns off."""
    off = [kind for switch, kind in SWITCHES.items() if cfg.trainer.get(switch) is False]
    if not loggers:  # a learning-rate monitor has nowhere to write
        off.append(LearningRateMonitor)
    callbacks = _instantiate_each(cfg.callbacks, "callbacks")
    for callback in callbacks:
        if isinstance(callback, tuple(off)):
            log.info("%s left out: trainer.enable_*=false or no logger turns it off", type(callback).__name__)
    return [callback for callback in callbacks if not isinstance(callback, tuple(off))]


def _plain(node: Any) -> Any:
    """Plain Python values for hyperparameters: checkpoints then hold no OmegaConf objects."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
