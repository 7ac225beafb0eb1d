"""What train.py and test.py run: build what the config describes, fit or test it, write metrics.json.

Read top down: the error wrapper, train, test, then their helpers in the order they call them.
"""

import atexit
import errno
import functools
import gc
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf, open_dict

from cnn_exp import (
    assemble,
    build,
    console,
    export,
    precision,
    predict,
    provenance,
    record,
    report,
    resume,
    rundir,
    schema,
    signals,
    sweep,
)
from cnn_exp.callbacks import EarlyStopping
from cnn_exp.classifier import Classifier
from cnn_exp.errors import UserError, is_number, plain, shown
from cnn_exp.signals import Interrupted, StopOnSignal
from cnn_exp.tensorboard import log_hparams

log = logging.getLogger(__name__)


def setup() -> None:
    """What Hydra needs before it composes a config of this project: whether a run directory the command line names
    exists yet, the resolvers conf/ uses and the schemas its options extend; and the garbage collector on, with what
    the imports made frozen. train.py and test.py call it on import (a launcher's worker processes import them too)."""
    rundir.note_given_run_dir(sys.argv[1:])
    rundir.register_resolvers()
    precision.register_resolver()
    console.register_help_resolver()
    schema.store()
    _freeze_imports()
    gc.enable()  # train.py and test.py pause it while they import


@functools.cache
def _freeze_imports() -> None:
    """Leave what the imports made (torch, Lightning, Hydra, Matplotlib: some 500,000 objects that live as long as
    the process) out of the garbage collector's scans, from now on and at exit. Each full collection scans them all:
    while they were made (train.py and test.py pause the collector for that) and during a one-epoch run that came to
    8 collections and 0.9 s, and the one at exit took 1.4 s more. Once per process: a run's own objects, and in a
    sweep each job's, are collected as before."""
    gc.freeze()
    atexit.register(gc.freeze)  # what the run made too: the process is ending, the system takes its memory back


def reports_user_errors(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Turn a UserError, however deeply wrapped (Hydra wraps errors raised while instantiating), into one message.

    A single run exits with status 1 and the message alone. In a sweep a failed job must not stop the others:
    its traceback goes to its log, metrics.json records it as failed, and the sweep summary (cnn_exp/sweep.py)
    lists it and makes the sweep exit with status 1.
    """

    @functools.wraps(task)
    def wrapper(cfg: DictConfig) -> Any:
        try:
            if HydraConfig.get().mode == RunMode.MULTIRUN and (signum := signals.held()) is not None:
                raise Interrupted(signum, before_job=True)  # it came after the last job's training
            return task(cfg)
        except Interrupted as stop:
            print(_stopped_message(stop, cfg.paths.output_dir), file=sys.stderr)
            sweeping = HydraConfig.get().mode == RunMode.MULTIRUN
            if not record.path(cfg.paths.output_dir).exists():  # stopped before it started: nothing to keep
                rundir.discard_unstarted(cfg.paths.output_dir, new=sweeping)  # a job not run: the summary says so
            if sweeping:
                # The jobs after this one must not start: the summary lists them as not run.
                sweep.write_stopped(Path(HydraConfig.get().sweep.dir), cfg.get("optimized_metric") or record.OPTIMIZED)
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
            rundir.discard_unstarted(cfg.paths.output_dir)  # a mistake in the command leaves no half-made run
            # One line whatever the message holds: it may quote a file's text (a class name, a key, a file name).
            sys.exit(f"error: {shown(cause, limit=2000)}")
        finally:
            rundir.release(cfg.paths.output_dir)

    return wrapper


def _stopped_message(stop: Interrupted, output_dir: str) -> str:
    if stop.before_job:
        return f"{stop.name}: the sweep stops before this job; its summary lists the jobs it ran, and those it did not"
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
    assemble.silence_known_warnings()
    # A signal stops the run cleanly from its first moment: while it starts (loads its data, say) it stops at once
    # with nothing to save, and `resume=` or a requeued SLURM job starts it again from the beginning.
    stopper = StopOnSignal(Path(cfg.paths.output_dir) / "checkpoints")
    with stopper.handling():
        return _train(cfg, stopper)


def _train(cfg: DictConfig, stopper: StopOnSignal) -> float | None:
    start, output_dir = time.perf_counter(), Path(cfg.paths.output_dir)
    if rank_zero_only.rank == 0:  # DDP's other ranks work in rank zero's directory (resume.start)
        rundir.check_claimed(output_dir)
    begin = resume.start(cfg)  # which config and which checkpoint: decided, read and checked once
    cfg = begin.cfg
    assemble.check_monitored_metrics(cfg)
    assemble.check_run_settings(cfg)
    reporting = report_settings(cfg)
    if cfg.get("resume") and rank_zero_only.rank == 0:
        resume.keep_edited_config(output_dir)
    assemble.save_config(cfg, output_dir / "config.yaml")
    console.print_run_header(cfg, output_dir)
    assemble.set_threads(cfg.get("threads"))
    L.seed_everything(cfg.seed, workers=True)
    model, datamodule = assemble.model_and_data(cfg)
    begin.check(model, datamodule)
    trainer = assemble.trainer(cfg, stopper)
    parameters = sum(p.numel() for p in model.net.parameters())
    settings = {**begin.settings, "parameters": parameters, "threads": torch.get_num_threads()}
    extra = {"what_ran": _what_ran(cfg, settings, model, datamodule, "train.py"), "report": reporting}
    extra |= {"resumes": _resumes(output_dir), "provenance": provenance.collect(datamodule)}
    write = functools.partial(_write_record, trainer, output_dir, settings, start, extra)
    write({"status": record.RUNNING})
    report.write(output_dir)
    log_hparams(trainer, settings)
    result: dict[str, Any] = {"status": record.INTERRUPTED}  # unless it finishes, fails or is stopped by a signal
    try:
        result = _fit_and_test(cfg, trainer, model, datamodule, begin.step)
    except Interrupted as stop:
        result = {"status": record.INTERRUPTED, "signal": stop.name, "requeued": stop.requeued}
        result["resume"] = f"python train.py resume={output_dir}"
        raise
    except Exception as err:
        result = {"status": record.FAILED, "error": _error_text(err)}
        raise
    finally:
        with stopper.deferred():  # a second signal now would leave the record saying "running"
            # As the data was read: its files' MD5s checked, a folder's mean and std measured.
            extra["provenance"]["data_files"] = provenance.data_files(datamodule)
            extra["what_ran"] = _what_ran(cfg, settings, model, datamodule, "train.py")
            write(result)
            if trainer.is_global_zero:
                report.write(output_dir)
    return result["metrics"].get(cfg.get("optimized_metric"))


def _fit_and_test(
    cfg: DictConfig, trainer: L.Trainer, model: Classifier, datamodule: L.LightningDataModule, start_step: int
) -> dict[str, Any]:
    """Fit, then test unless `test=false`: the best checkpoint on val/acc when there is one, else the weights training
    ended with. The record of a finished run."""
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    trained = trainer.global_step > start_step
    if cfg.ckpt_path and not trained and not cfg.get("resume"):
        raise UserError(resume.nothing_left_message(cfg.ckpt_path, cfg.trainer.max_epochs, None))
    # Without anything trained, a resumed run had ended its training before it stopped, in its final test.
    metrics = _epoch_metrics(trainer) if trained else _restored_metrics(trainer, model, datamodule)
    _check_trained(model, metrics)
    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint and checkpoint.monitor else ""
    if cfg.test:
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        metrics |= _epoch_metrics(trainer)
        _check_trained(model, metrics)
    return {
        "status": record.FINISHED,
        "metrics": metrics,
        "best": {record.VAL_ACC: float(checkpoint.best_model_score), "checkpoint": best} if best else None,
        "tested": (best or "final weights") if cfg.test else None,
        "early_stopping": next((c.stopped for c in trainer.callbacks if isinstance(c, EarlyStopping)), None),
    }


def _write_record(
    trainer: L.Trainer, output_dir: Path, settings: dict[str, Any], start: float, extra: dict[str, Any], result: dict
) -> None:
    """metrics.json with `result`, the progress, the time so far, the settings, what ran and where it came from
    (`extra`), and config.yaml's SHA-256 (so that an edit of it is seen on resume). Under DDP every rank calls this;
    one writes."""
    if not trainer.is_global_zero:
        return
    progress = {"epochs": trainer.current_epoch, "steps": trainer.global_step}
    written = {"wall_time_s": round(time.perf_counter() - start, 2), "settings": settings, "run_dir": str(output_dir)}
    written |= extra
    try:
        record.write(
            output_dir, {**result, **progress, **written, "config_sha256": record.digest(output_dir / "config.yaml")}
        )
    except OSError as err:  # a full disk: what ended the run is the error to report, not this one
        if result["status"] == record.RUNNING:
            raise
        log.error("%s could not be updated (%s): it still says running", record.path(output_dir), err)


@reports_user_errors
def test(cfg: DictConfig) -> float:
    """Rebuild model and data from a checkpoint alone, test on the official test split, write metrics.json."""
    assemble.silence_known_warnings()
    start = time.perf_counter()
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise UserError("test.py needs ckpt_path=<file>.ckpt, e.g. outputs/train/runs/<run>/checkpoints/last.ckpt")
    assemble.check_accelerator(cfg)
    # A test is a run of its own: one process per directory, and never in one that holds a run (a training run's
    # record would be replaced by the test's, and the training could never be continued).
    if rank_zero_only.rank == 0:
        rundir.check_entered(cfg.paths.output_dir, "test")
    predict.check_batch_size(cfg.get("batch_size"))
    # Settings that only train.py takes would be ignored here without a word (Hydra suggests +key= for them).
    groups = ("model", "data", "classifier", "optimizer", "scheduler", "experiment")
    if ignored := [group for group in groups if group in cfg]:
        raise UserError(
            f"test.py rebuilds network, data and scoring (classifier.*) from the checkpoint: {', '.join(ignored)} "
            "settings cannot change them (batch_size=N sets the test batch size, paths.* where the data is)"
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
    # In the precision the checkpoint trained in unless one is given: then its test gives the run's own test metrics.
    chosen = cfg.trainer.get("precision") or model.trained_precision or precision.FP32
    callbacks = assemble.callbacks(cfg, loggers=[])
    trainer: L.Trainer = build.instantiated(cfg.trainer, "trainer", precision=chosen, logger=False, callbacks=callbacks)
    with open_dict(cfg):
        cfg.trainer.precision = str(trainer.precision)  # as it runs here: Lightning may replace one (16-mixed on a CPU)
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
            "what_ran": _what_ran(
                cfg,
                {
                    "overrides": list(HydraConfig.get().overrides.task),
                    "parameters": sum(p.numel() for p in model.net.parameters()),
                    "model": type(model.net).__name__,
                    "data": build.dotted(type(datamodule)).rsplit(".", 1)[-1],
                },
                model,
                datamodule,
                "test.py",
            ),
            "report": report_settings(cfg),
            "provenance": provenance.collect(datamodule),
        },
    )
    report.write(cfg.paths.output_dir)
    return metrics[record.TEST_ACC]


def _what_ran(
    cfg: DictConfig, settings: dict[str, Any], model: Classifier, datamodule: L.LightningDataModule, script: str
) -> dict[str, Any]:
    """What ran, in a line each (the report's first section): the command as typed, network, data, optimizer,
    schedule, the loss and scoring settings, the callbacks, seed, precision (the device is the provenance's)."""
    data = {key: value for key, value in datamodule.hparams.items() if key not in ("data_dir", "mirror", "classes")}
    choices = [f"experiment {settings['experiment']}: "] if settings.get("experiment") else []
    scoring = {key: value for key, value in model.hparams.items() if key not in ("net", "optimizer", "scheduler")}
    lines = {
        "network": f"{build.short(model.hparams.net)} ({settings.get('parameters', 0):,} parameters)",
        "data": build.short({"_target_": build.dotted(type(datamodule)), **data}),
        "optimizer": build.short(model.hparams.optimizer),
        "scheduler": build.short(model.hparams.scheduler),
        "classifier": build.short(scoring),
        "callbacks": ", ".join(name for name, value in (cfg.get("callbacks") or {}).items() if value) or "none",
        "seed": str(cfg.get("seed")),
        "precision": str(cfg.trainer.get("precision")),
    }
    title = "".join(choices) + f"{settings.get('model')} on {settings.get('data')}"
    command = " ".join(["python", script, *settings.get("overrides", [])])
    return {"command": command, "lines": lines, "title": title, "images": _images_per_epoch(cfg, datamodule)}


def _images_per_epoch(cfg: DictConfig, datamodule: L.LightningDataModule) -> dict[str, int]:
    """How many images each split serves an epoch, where every one is (no limit_*_batches): the report's counts in
    the notebook's units. Known once the data is read, for the project's in-memory DataModules."""
    sizes = {}
    for split, limit in (("train", "limit_train_batches"), ("val", "limit_val_batches")):
        dataset = getattr(datamodule, f"{split}_set", None)
        if dataset is not None and cfg.trainer.get(limit) in (None, 1.0):
            sizes[split] = len(dataset)
    return sizes


def report_settings(cfg: DictConfig) -> dict[str, Any]:
    """The report's settings as the record keeps them (cnn_exp/report.py reads them there)."""
    settings = plain(cfg.get("report") or {"enabled": False})
    if not isinstance(settings.get("enabled", True), bool):
        raise UserError(f"report.enabled={settings['enabled']} must be true or false")
    if settings.get("lang", "en") not in report.WORDS:
        raise UserError(f"report.lang={settings['lang']} is not one of {', '.join(report.WORDS)}")
    target = settings.get("target")
    if target is not None and not (is_number(target) and 0 < target < 1):
        raise UserError(f"report.target={target} must be a test accuracy between 0 and 1 (0.87), or null")
    return settings


def _resumes(output_dir: Path) -> list[str]:
    """When the run was continued (resume=, a requeued job), this start included: a run directory that already holds
    a record is one being continued (a new run never enters one), and its record lists the earlier continuations."""
    earlier = record.read(output_dir)
    if earlier is None:
        return []
    previous = earlier.get("resumes") if isinstance(earlier.get("resumes"), list) else []
    return [*map(str, previous), time.strftime("%Y-%m-%d %H:%M:%S")]


def _restored_metrics(trainer: L.Trainer, model: Classifier, datamodule: L.LightningDataModule) -> dict[str, float]:
    """The last epoch's metrics of a run whose training had ended before it stopped: the train means from the epoch
    sums its checkpoint holds, the validation measured again (the same weights give the same numbers)."""
    metrics = model.train_metrics()
    if datamodule.hparams.get("val_size", True):  # a DataModule without val_size: its own val_dataloader says
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
