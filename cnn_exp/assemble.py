"""What train.py and test.py assemble from a config, each object one build: the model and data, the Trainer with its
callbacks, loggers and plugins; and the run-level settings, checked before any of it is built."""

import contextlib
import logging
import math
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Checkpoint, LearningRateMonitor, ModelSummary, ProgressBar
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from cnn_exp import build
from cnn_exp.classifier import Classifier
from cnn_exp.errors import UserError, is_number, is_whole, plain
from cnn_exp.signals import StopOnSignal, slurm_requeue_signal

log = logging.getLogger(__name__)


def model_and_data(cfg: DictConfig) -> tuple[Classifier, L.LightningDataModule]:
    """The data first, which says its images' shape and classes (model settings left null take them), then the
    model; their class counts must agree (else the first validation fails, an epoch in)."""
    target = str(cfg.data.get("_target_"))
    build.trusted_class("data", target, "data._target_")  # conf/ and the user's config directory name DataModules
    # A DataModule of one's own refusing its settings: its own words, one line.
    where = f"data._target_={target} cannot be built from data's settings"
    datamodule: L.LightningDataModule = build.instantiated(cfg.data, where, _convert_="all")
    build.check_datamodule(datamodule, f"data._target_={target}")
    model = Classifier(
        net=build.with_data_shape(plain(cfg.model), datamodule),
        optimizer=plain(cfg.optimizer),
        scheduler=plain(cfg.scheduler),
        **plain(cfg.get("classifier") or {}),
    )
    if len(datamodule.classes) != model.net.num_classes:
        raise UserError(
            f"the data has {len(datamodule.classes)} classes, but the network has "
            f"model.num_classes={model.net.num_classes} outputs: give them the same number (null: the data's)"
        )
    # On the GPU Lightning will train on: a network of one's own may need it.
    on_gpu = torch.cuda.is_available() and str(cfg.trainer.get("accelerator", "auto")) in ("auto", "gpu", "cuda")
    build.check_forward(model.net, f"model._target_={cfg.model.get('_target_')}", "cuda" if on_gpu else "cpu")
    return model, datamodule


def trainer(cfg: DictConfig, stopper: StopOnSignal) -> L.Trainer:
    """The configured Trainer with its callbacks (and `stopper`, which saves the exact state on a signal), loggers
    and plugins."""
    loggers = instantiate_each(cfg.get("logger"), "logger")
    stopper.save = cfg.trainer.get("enable_checkpointing") is not False
    profiled = bool(cfg.trainer.get("profiler"))
    built = build.instantiated(
        cfg.trainer,
        "trainer",
        callbacks=[*callbacks(cfg, loggers), stopper],
        logger=loggers or False,
        plugins=plugins(cfg),
        **({} if profiled else {"profiler": Unprofiled()}),
    )
    if not profiled:  # a profiler times every callback's every hook, as Lightning calls them
        skip_absent_batch_hooks(built.callbacks)
    return built


# The hooks Lightning calls on every callback at every batch, whether the callback defines them or not.
BATCH_HOOKS = (
    "on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
    "on_before_zero_grad", "on_train_batch_end", "on_validation_batch_start", "on_validation_batch_end",
    "on_test_batch_start", "on_test_batch_end", "on_predict_batch_start", "on_predict_batch_end",
)  # fmt: skip


def skip_absent_batch_hooks(callbacks: list[L.Callback]) -> None:
    """Stop Lightning calling the per-batch hooks a callback leaves to `Callback`'s empty ones.

    Lightning calls each of a training step's six callback hooks on every callback (~0.7 µs a call: some 60 calls a
    step with this project's callbacks, ~1 % of Network3's step at batch 40); its dispatcher passes over a hook that
    is not callable, so such a hook is set to None on the callback. A hook given to the instance (LambdaCallback's) is
    its own and stays.
    """
    for callback in callbacks:
        for hook in BATCH_HOOKS:
            if getattr(getattr(callback, hook), "__func__", None) is getattr(L.Callback, hook):
                setattr(callback, hook, None)


class Unprofiled(PassThroughProfiler):
    """What the Trainer runs with when trainer.profiler chooses none: Lightning's own no-op profiler, without its cost.

    Lightning wraps every hook call in `profiler.profile(name)`, each callback's included: some 80 calls a training
    step with this project's callbacks, and its no-op profiler makes a generator-based context for each (~1 µs, 2 % of
    Network3's step at batch 40). This one hands back one shared context that does nothing.
    """

    def profile(self, action_name: str) -> contextlib.AbstractContextManager:
        return _NOTHING


_NOTHING = contextlib.nullcontext()


def silence_known_warnings() -> None:
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
    threading.excepthook = _thread_error


def _thread_error(args: threading.ExceptHookArgs) -> None:
    """A background thread's OSError (TensorBoard's event writer on a full disk) as one warning line, not a
    traceback: the run's own error line says what to do. Anything else as Python shows it."""
    if isinstance(args.exc_value, OSError):
        name = args.thread.name if args.thread else "a background thread"
        log.warning("%s could not write: %s", name, args.exc_value.strerror or args.exc_value)
    else:
        threading.__excepthook__(args)


def _not_a_litlogger_advert(log_record: logging.LogRecord) -> bool:
    # A named function, not a lambda: adding it again (one process runs every job of a sweep) adds nothing.
    return "litlogger" not in log_record.getMessage()


def plugins(cfg: DictConfig) -> list[Any]:
    """The Trainer's configured plugins; under SLURM, also its environment without Lightning's auto-requeue, whose
    signal StopOnSignal acts on at a batch boundary instead (cnn_exp/signals.py says why)."""
    plugins = [instantiate(node) for node in cfg.trainer.get("plugins") or []]
    if slurm_requeue_signal() is not None:
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def check_monitored_metrics(cfg: DictConfig) -> None:
    """Early stopping on a validation metric needs a validation split; without one Lightning fails after epoch 1."""
    for key, node in (cfg.callbacks or {}).items():
        monitor = str((node or {}).get("monitor") or "")
        if (
            cfg.data.get("val_size") == 0
            and monitor.startswith("val/")
            and "EarlyStopping" in str(node.get("_target_"))
        ):
            raise UserError(
                f"callbacks.{key} stops on {monitor}, but data.val_size=0 leaves no validation split: "
                "set data.val_size (e.g. 5000) or drop the callback"
            )


def check_accelerator(cfg: DictConfig) -> None:
    """A GPU asked for (trainer=gpu, trainer=ddp) where there is none: said before anything else, not by Lightning
    once the run has started."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(
            f"trainer.accelerator={accelerator} (trainer=gpu, trainer=ddp) asks for a CUDA GPU, and this machine has "
            "none: use trainer=default (a GPU when there is one), trainer=cpu or trainer=ddp_cpu"
        )


def check_experiment_choices(cfg: DictConfig) -> None:
    """One experiment, which chooses its model and optimizer and sets their settings: another `model=` or `optimizer=`
    on the command line would be that file under the experiment's settings, recorded by its name (experiment=mnist_fast
    model=net3 built mnist_fast's two-conv network, recorded as net3). Checked only when both are given."""
    if not (HydraConfig.initialized() and GlobalHydra.instance().is_initialized()):  # composed by a program
        return
    hydra = HydraConfig.get()
    given = {o.key_or_group: o for o in OverridesParser.create().parse_overrides(list(hydra.overrides.task))}
    if "experiment" not in given:
        return
    experiment = given["experiment"].value()
    if not isinstance(experiment, str):
        raise UserError(f"experiment={experiment} must name one recipe: each sets a whole run (data, model, optimizer)")
    chosen = {group: given[group].value() for group in ("model", "optimizer") if group in given}
    if not chosen:
        return
    own = compose(hydra.job.config_name, [f"experiment={experiment}"], return_hydra_config=True)
    for group, choice in chosen.items():
        theirs = own.hydra.runtime.choices.get(group)
        if choice != theirs and compose(hydra.job.config_name, [f"{group}={theirs}"])[group] != own[group]:
            raise UserError(
                f"experiment={experiment} chooses {group}={theirs} and sets its settings: {group}={choice} would be "
                f"{choice}'s file under them, recorded as {choice}. Change its settings instead ({group}.…=…), or "
                "leave out experiment="
            )


def check_run_settings(cfg: DictConfig) -> None:
    """seed, threads and the classifier's settings, which torch and numpy would otherwise refuse with a traceback."""
    check_accelerator(cfg)
    check_experiment_choices(cfg)
    seed, threads, classifier = cfg.seed, cfg.get("threads"), cfg.get("classifier") or {}
    unknown = set(classifier) - set(build.CLASSIFIER_SETTINGS)
    if unknown:
        raise UserError(
            f"classifier.{sorted(unknown)[0]} is not a setting of the classifier "
            f"(it takes {', '.join(build.CLASSIFIER_SETTINGS)})"
        )
    if classifier.get("flip_average") and cfg.data.get("dataset") == "MNIST":
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
    # A share of the validation batches that is none of them: Lightning would say so only once the run has started.
    share = cfg.trainer.get("limit_val_batches")
    images, batch = OmegaConf.select(cfg, "data.val_size"), OmegaConf.select(cfg, "data.batch_size")
    if isinstance(share, float) and 0 < share < 1 and is_whole(images) and is_whole(batch) and images > 0 < batch:
        batches = math.ceil(images / batch)
        if int(share * batches) < 1:
            raise UserError(
                f"trainer.limit_val_batches={share} leaves none of the {batches} validation batches: give at least "
                f"{1 / batches:.2g}, or a number of batches"
            )
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


def set_threads(threads: int | None) -> None:
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


def instantiate_each(group: DictConfig | None, name: str) -> list[Any]:
    """Build every entry of a group that holds several objects by name (callbacks, loggers)."""
    for key, node in (group or {}).items():
        # An entry with settings but no class: an experiment tunes an object that the group chosen (e.g.
        # callbacks=none) does not define. Instantiated, it would reach Lightning as a dict and fail deep inside.
        if node and "_target_" not in node:
            raise UserError(
                f"{name}.{key} sets {', '.join(map(str, node))} but names no _target_: the {name} config chosen "
                f"does not define {key}. Drop it with ~{name}.{key}, or choose a {name} config that has it."
            )
    return [build.instantiated(node, f"{name}.{key}") for key, node in (group or {}).items() if node]


# Lightning's switches for its own defaults turn ours off too (Lightning would refuse the pair with a traceback).
TURNED_OFF_BY_LIGHTNING = {
    "enable_progress_bar": ProgressBar,
    "enable_checkpointing": Checkpoint,
    "enable_model_summary": ModelSummary,
}


def callbacks(cfg: DictConfig, loggers: list[Any]) -> list[Any]:
    """The configured callbacks, less those that `trainer.enable_*=false` or a run without loggers turns off."""
    off = [kind for switch, kind in TURNED_OFF_BY_LIGHTNING.items() if cfg.trainer.get(switch) is False]
    if not loggers:  # a learning-rate monitor has nowhere to write
        off.append(LearningRateMonitor)
    callbacks = instantiate_each(cfg.callbacks, "callbacks")
    for callback in callbacks:
        if isinstance(callback, tuple(off)):
            log.info("%s left out: trainer.enable_*=false or no logger turns it off", type(callback).__name__)
    return [callback for callback in callbacks if not isinstance(callback, tuple(off))]
