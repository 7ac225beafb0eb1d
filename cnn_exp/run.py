"""What train.py and test.py run: build what the config describes, fit or test it, write metrics.json.

Read top down: the error wrapper, train, test, then their helpers in the order they call them.
"""

import errno
import functools
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Checkpoint, LearningRateMonitor, ModelSummary, ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from cnn_exp import build, console, export, precision, predict, record, resume, rundir, schema, sweep
from cnn_exp.callbacks import EarlyStopping
from cnn_exp.classifier import Classifier
from cnn_exp.data import MNISTDataModule
from cnn_exp.errors import UserError, is_number, is_whole, shown
from cnn_exp.signals import Interrupted, StopOnSignal, slurm_requeue_signal
from cnn_exp.tensorboard import log_hparams

log = logging.getLogger(__name__)


def setup() -> None:
    """What Hydra needs before it composes a config of this project: the resolvers conf/ uses and the schemas its
    options extend. train.py and test.py call it on import (a launcher's worker processes import them too)."""
    resume.register_resolvers()
    precision.register_resolver()
    schema.store()


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
        except Interrupted as stop:
            print(_stopped_message(stop, cfg.paths.output_dir), file=sys.stderr)
            if HydraConfig.get().mode == RunMode.MULTIRUN:
                # The jobs after this one must not start: the summary lists them as not run.
                sweep.write_stopped(Path(HydraConfig.get().sweep.dir), cfg.get("optimized_metric") or "val/acc")
            sys.exit(stop.exit_code)
        except Exception as err:
            if HydraConfig.get().mode == RunMode.MULTIRUN:
                log.exception("job failed: %s", _error_text(err))
                # It failed before training started, in a directory of its own (not one it was refused in).
                if rundir.holds_lock(cfg.paths.output_dir) and not record.path(cfg.paths.output_dir).exists():
                    record.write(cfg.paths.output_dir, {"status": record.FAILED, "error": _error_text(err)})
                return None
            cause = _user_error(err)
            if cause is None:
                raise
            # One line whatever the message holds: it may quote a file's text (a class name, a key, a file name).
            sys.exit(f"error: {shown(cause, limit=2000)}")
        finally:
            rundir.release(cfg.paths.output_dir)

    return wrapper


def _stopped_message(stop: Interrupted, output_dir: str) -> str:
    if not any((Path(output_dir) / "checkpoints").glob("*.ckpt")):
        if stop.requeued:
            return f"{stop.name}: stopped before anything was saved; SLURM requeued the job, it starts again"
        if not record.path(output_dir).exists():
            return f"{stop.name}: stopped before the run started; start it again"
        return (
            f"{stop.name}: stopped before anything was saved. Start it again with: python train.py resume={output_dir}"
        )
    if stop.requeued:
        return f"{stop.name}: the training state is saved and SLURM requeued the job; it continues in {output_dir}"
    return f"{stop.name}: stopped, the training state is saved. Continue with: python train.py resume={output_dir}"


@reports_user_errors
def train(cfg: DictConfig) -> float | None:
    """Fit the configured model, test it unless `test=false`, and write metrics.json; return `optimized_metric`.

    metrics.json is written when training starts (status running) and again however the run ends: finished,
    failed (with the error) or interrupted (a signal: Ctrl-C, a scheduler's SIGTERM). Only a finished run reports
    metrics, and only finite ones. With `resume=<run dir>` the run continues in that directory, with its config,
    from its newest checkpoint; so does a requeued SLURM job that finds its own unfinished run.
    """
    _silence_known_warnings()
    # A signal stops the run cleanly from its first moment: while it starts (loads its data, say) it stops at once
    # with nothing to save, and `resume=` or a requeued SLURM job starts it again from the beginning.
    stopper = StopOnSignal(Path(cfg.paths.output_dir) / "checkpoints")
    with stopper.handling():
        return _train(cfg, stopper)


def _train(cfg: DictConfig, stopper: StopOnSignal) -> float | None:
    start = time.perf_counter()
    output_dir = Path(cfg.paths.output_dir)
    other_rank = rank_zero_only.rank != 0  # DDP's other ranks work in rank zero's directory (resume.start)
    if not other_rank:
        rundir.check_claimed(output_dir)
    begin = resume.start(cfg)  # which config and which checkpoint, decided, read and checked once
    cfg, settings = begin.cfg, begin.settings
    _check_monitored_metrics(cfg)
    _check_run_settings(cfg)
    if cfg.get("resume") and not other_rank:
        resume.keep_edited_config(output_dir)
    save_config(cfg, output_dir / "config.yaml")
    console.print_run_header(cfg, output_dir)
    _set_threads(cfg.get("threads"))
    L.seed_everything(cfg.seed, workers=True)

    # The model first: a network that cannot be built fails before any data is read.
    model = Classifier(
        net=build.plain(cfg.model),
        optimizer=build.plain(cfg.optimizer),
        scheduler=build.plain(cfg.scheduler),
        **build.plain(cfg.get("classifier") or {}),
    )
    datamodule: MNISTDataModule = instantiate(cfg.data, _convert_="all")
    if len(datamodule.classes) != model.net.out.out_features:  # else the first validation fails, an epoch in
        raise UserError(
            f"data.classes names {len(datamodule.classes)} classes, but the network has "
            f"model.num_classes={model.net.out.out_features} outputs: give them the same number"
        )
    begin.check(model, datamodule)
    loggers = _instantiate_each(cfg.get("logger"), "logger")
    stopper.save = cfg.trainer.get("enable_checkpointing") is not False
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=[*_callbacks(cfg, loggers), stopper], logger=loggers or False, plugins=_plugins(cfg)
    )
    settings["parameters"] = sum(p.numel() for p in model.net.parameters())
    settings["threads"] = torch.get_num_threads()

    def write_record(result: dict[str, Any]) -> None:
        if trainer.is_global_zero:  # under DDP every rank runs this function; one writes the results
            progress = {"epochs": trainer.current_epoch, "steps": trainer.global_step}
            elapsed = round(time.perf_counter() - start, 2)
            written = {"config_sha256": record.digest(output_dir / "config.yaml")}  # so that an edit is seen
            try:
                record.write(
                    output_dir,
                    {**result, **progress, "wall_time_s": elapsed, "settings": settings, "run_dir": str(output_dir)}
                    | written,
                )
            except OSError as err:  # a full disk: what ended the run is the error to report, not this one
                if result["status"] == record.RUNNING:
                    raise
                log.error("%s could not be updated (%s): it still says running", record.path(output_dir), err)

    write_record({"status": record.RUNNING})
    log_hparams(trainer, settings)
    # Unless training finishes, fails or is stopped by a signal, something else ended it (SystemExit).
    result: dict[str, Any] = {"status": record.INTERRUPTED}
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        trained = trainer.global_step > begin.step
        if cfg.ckpt_path and not trained and not cfg.get("resume"):
            raise UserError(resume.nothing_left_message(cfg.ckpt_path, cfg.trainer.max_epochs, None))
        # Without anything trained, a resumed run had ended its training before it stopped, in its final test.
        metrics = _epoch_metrics(trainer) if trained else _restored_metrics(trainer, model, datamodule)
        _check_trained(model, metrics)
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint and checkpoint.monitor else ""
        if cfg.test:
            # The best checkpoint on val/acc when there is one; else the weights training ended with.
            trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
            metrics |= _epoch_metrics(trainer)
            _check_trained(model, metrics)
        result = {
            "status": record.FINISHED,
            "metrics": metrics,
            "best": {"val/acc": float(checkpoint.best_model_score), "checkpoint": best} if best else None,
            "tested": (best or "final weights") if cfg.test else None,
            "early_stopping": next((c.stopped for c in trainer.callbacks if isinstance(c, EarlyStopping)), None),
        }
    except Interrupted as stop:
        result = {"status": record.INTERRUPTED, "signal": stop.name, "requeued": stop.requeued}
        result["resume"] = f"python train.py resume={output_dir}"
        raise
    except Exception as err:
        result = {"status": record.FAILED, "error": _error_text(err)}
        raise
    finally:
        write_record(result)
    return result["metrics"].get(cfg.get("optimized_metric"))


@reports_user_errors
def test(cfg: DictConfig) -> float:
    """Rebuild model and data from a checkpoint alone, test on the official test split, write metrics.json."""
    _silence_known_warnings()
    start = time.perf_counter()
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise UserError("test.py needs ckpt_path=<file>.ckpt, e.g. outputs/train/runs/<run>/checkpoints/last.ckpt")
    # A test is a run of its own: one process per directory, and never in one that holds a run (a training run's
    # record would be replaced by the test's, and the training could never be continued).
    if rank_zero_only.rank == 0:
        rundir.check_claimed(cfg.paths.output_dir)
        rundir.check_new(cfg.paths.output_dir, "test")
    predict.check_batch_size(cfg.get("batch_size"))
    # Settings that only train.py takes would be ignored here without a word (Hydra suggests +key= for them).
    if ignored := [group for group in ("model", "data", "optimizer", "scheduler", "experiment") if group in cfg]:
        raise UserError(
            f"test.py rebuilds network and data from the checkpoint: {', '.join(ignored)} settings cannot change "
            "them (batch_size=N sets the test batch size, paths.* where the data is)"
        )
    # What else test.py does with a checkpoint: predict=PATH (cnn_exp/predict.py), export=onnx (cnn_exp/export.py).
    if cfg.get("predict") is not None or cfg.get("export") is not None:
        return predict.run(cfg) if cfg.get("predict") is not None else export.run(cfg)
    path = Path(cfg.ckpt_path)
    # Data lives where this machine keeps it, not where the checkpoint was trained.
    data_overrides = {"data_dir": cfg.paths.data_dir, "mirror": cfg.paths.data_mirror}
    if cfg.batch_size is not None:
        data_overrides["batch_size"] = cfg.batch_size
    model, datamodule = predict.from_checkpoint(path, **data_overrides)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=_callbacks(cfg, loggers=[]))
    trainer.test(model, datamodule=datamodule, verbose=False)
    metrics = _epoch_metrics(trainer)
    _check_trained(model, metrics)
    record.write(
        cfg.paths.output_dir,
        {
            "status": record.FINISHED,
            "metrics": metrics,
            "tested": str(path),
            "wall_time_s": round(time.perf_counter() - start, 2),
            "settings": {"data": dict(datamodule.hparams), "model": dict(model.hparams)},
            "run_dir": cfg.paths.output_dir,
        },
    )
    return metrics["test/acc"]


def _silence_known_warnings() -> None:
    """Hide the warnings and messages of this task that ask nothing of a user; called as a task starts, so
    importing this module changes nothing."""
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
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_a_litlogger_advert)


def _not_a_litlogger_advert(log_record: logging.LogRecord) -> bool:
    # A named function, not a lambda: adding it again (one process runs every job of a sweep) adds nothing.
    return "litlogger" not in log_record.getMessage()


def _plugins(cfg: DictConfig) -> list[Any]:
    """The Trainer's configured plugins; under SLURM, also its environment without Lightning's auto-requeue, whose
    signal StopOnSignal acts on at a batch boundary instead (cnn_exp/signals.py says why)."""
    plugins = [instantiate(node) for node in cfg.trainer.get("plugins") or []]
    if slurm_requeue_signal() is not None:
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def _restored_metrics(trainer: L.Trainer, model: Classifier, datamodule: MNISTDataModule) -> dict[str, float]:
    """The last epoch's metrics of a run whose training had ended before it stopped: the train means from the epoch
    sums its checkpoint holds, the validation measured again (the same weights give the same numbers)."""
    metrics = {"train/loss": float(model.train_loss.compute()), "train/acc": float(model.train_acc.compute())}
    if datamodule.hparams.val_size:
        trainer.validate(model, datamodule=datamodule, verbose=False)
        metrics |= _epoch_metrics(trainer)
    return metrics


def _check_trained(model: L.LightningModule, metrics: dict[str, float]) -> None:
    """A finished run's numbers are finite, from finite weights; a last step can blow the weights up unseen."""
    broken = [f"{name} is {value}" for name, value in metrics.items() if not math.isfinite(value)]
    if not all(torch.isfinite(parameter).all() for parameter in model.parameters()):
        broken.insert(0, "the network's weights are not all finite")
    if broken:
        raise UserError(
            f"training diverged: {', '.join(broken)}. Lower optimizer.lr (now {model.hparams.optimizer.get('lr')}) "
            "or choose another optimizer."
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
    """seed, threads and the classifier's settings, which torch and numpy would otherwise refuse with a traceback."""
    seed, threads, classifier = cfg.seed, cfg.get("threads"), cfg.get("classifier") or {}
    unknown = set(classifier) - set(build.CLASSIFIER_SETTINGS)
    if unknown:
        raise UserError(
            f"classifier.{sorted(unknown)[0]} is not a setting of the classifier "
            f"(it takes {', '.join(build.CLASSIFIER_SETTINGS)})"
        )
    if classifier.get("flip_average") and cfg.data.dataset == "MNIST":
        raise UserError(
            "classifier.flip_average=true mirrors images, which turns digits into other shapes: FashionMNIST only"
        )
    if not is_whole(seed) or not 0 <= seed < 2**32:
        raise UserError(f"seed={seed} must be a whole number from 0 to {2**32 - 1}")
    if threads is not None and (not is_whole(threads) or threads < 1):
        raise UserError(f"threads={threads} must be a number of CPU threads (1 or more), or null for the default")
    if threads is not None and threads > (os.cpu_count() or 1):
        raise UserError(f"threads={threads} is more than this machine's {os.cpu_count()} CPU threads")
    # Lightning divides by it (a traceback in the first step) and takes 0 batches as "train nothing".
    every = cfg.trainer.get("log_every_n_steps")
    if every is not None and (not is_whole(every) or every < 1):
        raise UserError(f"trainer.log_every_n_steps={every} must be a whole number of at least 1")
    limit = cfg.trainer.get("limit_train_batches")
    if limit is not None and (not is_number(limit) or limit <= 0):
        raise UserError(
            f"trainer.limit_train_batches={limit} trains on no batch: give a share above 0 (0.1) or a number of batches"
        )
    # Lightning takes 0 and reports the untrained network's scores as the run's; -1 (with max_steps) has no end.
    for key in ("max_epochs", "max_steps"):
        value = cfg.trainer.get(key)
        if value is not None and (not is_whole(value) or value == 0 or value < -1):
            raise UserError(f"trainer.{key}={value} must be a whole number of at least 1 (or -1: no limit)")


@rank_zero_only
def save_config(cfg: DictConfig, save_to: Path) -> None:
    """Save the composed config, resolved, with the run (the console shows a short header instead)."""
    save_to.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, save_to, resolve=True)


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
TURNED_OFF_BY_LIGHTNING = {
    "enable_progress_bar": ProgressBar,
    "enable_checkpointing": Checkpoint,
    "enable_model_summary": ModelSummary,
}


def _callbacks(cfg: DictConfig, loggers: list[Any]) -> list[Any]:
    """The configured callbacks, less those that `trainer.enable_*=false` or a run without loggers turns off."""
    off = [kind for switch, kind in TURNED_OFF_BY_LIGHTNING.items() if cfg.trainer.get(switch) is False]
    if not loggers:  # a learning-rate monitor has nowhere to write
        off.append(LearningRateMonitor)
    callbacks = _instantiate_each(cfg.callbacks, "callbacks")
    for callback in callbacks:
        if isinstance(callback, tuple(off)):
            log.info("%s left out: trainer.enable_*=false or no logger turns it off", type(callback).__name__)
    return [callback for callback in callbacks if not isinstance(callback, tuple(off))]


def _epoch_metrics(trainer: L.Trainer) -> dict[str, float]:
    return {name: float(trainer.callback_metrics[name]) for name in record.METRICS if name in trainer.callback_metrics}


def _error_text(err: BaseException) -> str:
    """What metrics.json and the sweep summary say of an error: a UserError's message, else type and message."""
    cause = _user_error(err)
    return str(cause) if cause else f"{type(err).__name__}: {err}".strip()


def _user_error(err: BaseException) -> UserError | None:
    """The UserError behind `err`, if any: Hydra and Lightning wrap errors raised inside what they call. Two more are
    the user's to fix: a full disk, and a setting Lightning refuses (its MisconfigurationException, e.g. a
    limit_val_batches that leaves no batch)."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, UserError):
            return cause
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {cause.filename}" if cause.filename else ""
            return UserError(
                f"{cause.strerror}{where}: make room on that disk, then continue the run with resume=<its run dir>"
            )
        if isinstance(cause, MisconfigurationException):
            return UserError(f"trainer: {shown(str(cause).strip().splitlines()[0] if str(cause).strip() else cause)}")
        cause = cause.__cause__
    return None
