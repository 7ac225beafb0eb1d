"""Continuing a run that stopped: `resume=<run dir>` (in that run, with its own config) and `ckpt_path=<file>`
(a checkpoint's training, in a new run).

`start` decides, once, how a run of train.py starts (new, resume=, a requeued SLURM job, ckpt_path=), which config
and checkpoint it continues from, reads and checks that checkpoint once, and checks that it fits the model and data.
Which directory a resumed run writes in is rundir.py's (its resolvers). The rest of resuming lives with what it
restores, and must stay there:
- callbacks.py: the ModelCheckpoint callback that finds its files again when a run was moved, then resumed;
  conf/callbacks/step_checkpoint.yaml: the mid-epoch step.ckpt a killed run continues from;
- classifier.py: the Classifier saves and restores torch's random state and its epoch sums (on_save_checkpoint,
  on_load_checkpoint), so dropout, augmentation and epoch means go on as if never stopped;
- data.py: an InMemoryDataModule (MNIST's, a folder's) saves its position in the epoch (state_dict) and serves
  the rest of that epoch.
"""

import logging
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from cnn_exp import build, checkpoints, precision, record, rundir, sweep
from cnn_exp.classifier import Classifier
from cnn_exp.data import InMemoryDataModule
from cnn_exp.errors import UserError, is_whole, shown

log = logging.getLogger(__name__)


@dataclass
class Start:
    """Where a run of train.py starts: the config it runs with (the command's, or the resumed run's own), its key
    settings for the record, and the training state it continues (read and checked once), if any."""

    cfg: DictConfig
    settings: dict[str, Any]
    checkpoint: dict[str, Any] | None = None

    @property
    def step(self) -> int:
        """The optimizer step training continues from: 0 for a run from its beginning."""
        return self.checkpoint["global_step"] if self.checkpoint else 0

    def check(self, model: Classifier, datamodule: Any) -> None:
        """Refuse, before anything is recorded, a training state that does not fit the model, data and callbacks
        built from the config: a refused resume= then leaves its run as it was."""
        if self.checkpoint is not None:
            check_fits(self.checkpoint, self.cfg.ckpt_path, model, datamodule, _callback_classes(self.cfg))


def _callback_classes(cfg: DictConfig) -> list[type]:
    """The classes of the callbacks the config names (not built: a callback may act as it is made)."""
    classes = []
    for node in (cfg.get("callbacks") or {}).values():
        try:
            classes.append(build.class_at(str(node["_target_"])))
        except Exception:  # not a callback's config, or no such class: assemble.trainer says so, in its words
            continue
    return classes


def start(cfg: DictConfig) -> Start:
    """Decide, once, how a run of train.py starts: new, `resume=` of a run, a requeued SLURM job's own unfinished run
    (continued as if resumed), or a new run from `ckpt_path=`. The other ranks of a DDP run work in rank zero's
    directory, by design, with its config."""
    output_dir, other_rank = Path(cfg.paths.output_dir), rank_zero_only.rank != 0
    # How this process entered its directory was decided when Hydra chose it (cnn_exp/rundir.py): followed here.
    entered = "rank" if other_rank else rundir.entry(output_dir, "train", cfg.get("resume"))
    if cfg.get("resume"):
        cfg, settings = resumed_run(cfg)
    elif entered == "refused":
        rundir.check_entered(output_dir, "train")  # says why
    elif entered == "resumed" or (other_rank and rundir.requeued() and rundir.holds_a_run_record(output_dir)):
        cfg, settings = resumed_run(cfg, requeued=True)
        log.info("requeued: continuing the run in %s", output_dir)
    else:
        settings = record.settings(cfg)
    # The run's own config names its model and data (trusted input): its checkpoints may name those classes too.
    for group in ("model", "data"):
        if (target := OmegaConf.select(cfg, f"{group}._target_")) is not None:
            build.trust(group, str(target))
    if not cfg.ckpt_path:
        return Start(cfg, settings)
    return Start(cfg, settings, training_state(cfg.ckpt_path, cfg.trainer.max_epochs, cfg.get("resume")))


def resumed_run(cfg: DictConfig, requeued: bool = False) -> tuple[DictConfig, dict[str, Any]]:
    """The config and settings of the run `resume=` names, pointed at its newest checkpoint and where it lies now.

    `requeued`: a scheduler started the same command again in the run's own directory (a requeued SLURM job),
    which continues the run there as if resumed.
    """
    run_dir = Path(cfg.paths.output_dir if requeued else cfg.resume)
    named = f"hydra.run.dir={run_dir}" if requeued else f"resume={cfg.resume}"
    # Hydra's record of the composed config keeps its interpolations: resolved now, its paths name the run
    # directory where it lies now (moved or copied since), and paths.* overrides reach every use.
    saved = _yaml(run_dir / ".hydra" / "config.yaml")
    saved_record = record.read(run_dir)
    if not isinstance(saved, DictConfig) or saved_record is None or not isinstance(saved_record.get("settings"), dict):
        raise UserError(
            f"{named}: not a run directory of train.py (its .hydra/config.yaml or metrics.json is missing, or not "
            "what train.py writes)"
        )
    # Refused before anything is written: its metrics.json holds the run's results.
    if saved_record["status"] == record.FINISHED:
        raise UserError(
            f"{named}: this run already finished, there is nothing to continue. Test a checkpoint of it "
            "with test.py ckpt_path=..., or train it on in a new run: "
            f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'} trainer.max_epochs=N"
        )
    if not requeued and Path(cfg.paths.output_dir).resolve() != run_dir.resolve():
        raise UserError(f"{named} continues the run in its own directory: leave out hydra.run.dir")
    candidates = [run_dir / "checkpoints" / name for name in ("step.ckpt", "last.ckpt")]
    candidates = [path for path in candidates if path.is_file()]
    # Only where the data is may differ (another machine); anything else would silently not apply.
    given = list(HydraConfig.get().overrides.task)
    if requeued and given != list(_yaml(run_dir / ".hydra" / "overrides.yaml") or []):
        raise UserError(
            f"{run_dir} holds an unfinished run of another command: continue it with resume={run_dir}, or choose "
            "another hydra.run.dir"
        )
    if requeued:
        given = []
    allowed = ("resume", "paths.data_dir", "paths.data_mirror")
    if extra := [o for o in given if not (sweep.split_override(o)[0] in allowed or o.startswith("hydra."))]:
        raise UserError(
            f"resume= continues a run with its own config and takes no other settings ({' '.join(extra)}). "
            "To change them, start a new run from its checkpoint: ckpt_path=<run>/checkpoints/last.ckpt"
        )
    for key in ("data_dir", "data_mirror"):
        if any(sweep.split_override(o)[0] == f"paths.{key}" for o in given):
            saved.paths[key] = cfg.paths[key]
    # The precision chosen on the machine the run started on: a requeued job that lands on another kind of node
    # continues with the same arithmetic. Taken from the record only if it is one auto_precision could have chosen.
    started = saved_record["settings"].get("precision")
    chosen = "auto_precision" in str(OmegaConf.to_container(saved.trainer, resolve=False).get("precision"))
    if chosen and started in (precision.BF16, precision.FP32):
        saved.trainer.precision = started
    saved_record["settings"]["precision"] = str(saved.trainer.precision)
    # Stopped before it saved anything (a signal while it loaded its data): it starts again from its beginning, the
    # checkpoint it was started from included, if any.
    if candidates:
        saved.ckpt_path = str(_furthest(candidates))
    else:
        log.info("%s saved no checkpoint before it stopped: it starts again from the beginning", run_dir)
    saved.resume = str(run_dir)
    # Lightning's CSV logger empties a metrics.csv it finds: the resumed part goes beside it instead.
    for node in (saved.get("logger") or {}).values():
        if node and str(node.get("_target_", "")).endswith("CSVLogger"):
            node.version = f"{node.get('version') or ''}resumed-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    return saved, saved_record["settings"]


def _furthest(paths: list[Path]) -> Path:
    """The checkpoint that trained furthest, by its own count of steps, not by its file's time: a copy of the run
    that did not keep the times, or a clock set back, would hand the resume an older state. At the same step,
    last.ckpt, written after the epoch's validation. One without a training state (Lightning's save_weights_only)
    cannot be continued from: passed over for one that can, with a warning. Each is read and checked once (a
    damaged or crafted one is refused, named)."""
    if len(paths) == 1:
        return paths[0]
    progress, stateful, read = {}, [], {}
    for path in paths:
        checkpoint = read[path] = checkpoints.load(path)
        step = checkpoint.get("global_step")
        progress[path] = (step if is_whole(step) else -1, path.name == "last.ckpt")
        try:
            _check_state(checkpoint, f"ckpt_path={path}")
            stateful.append(path)
        except UserError:
            continue
    furthest = max(paths, key=progress.__getitem__)
    chosen = furthest if furthest in stateful or not stateful else max(stateful, key=progress.__getitem__)
    if chosen != furthest:  # (without any state to continue from, training_state says why)
        log.warning("%s holds no training state to continue from (weights only): continuing from %s", furthest, chosen)
    checkpoints.keep(chosen, read[chosen])  # for training_state, which then reads it no more
    return chosen


def keep_edited_config(run_dir: Path) -> None:
    """The run's config.yaml is a copy to read: a resumed run rewrites it from .hydra/config.yaml, Hydra's record,
    which is what it continues with. An edited copy is set aside under a name of its own, and the user told."""
    visible, written = run_dir / "config.yaml", (record.read(run_dir) or {}).get("config_sha256")
    if not isinstance(written, str) or record.digest(visible) in (None, written):
        return
    kept = visible.with_name(f"config.edited-{time.strftime('%Y-%m-%d_%H-%M-%S')}.yaml")
    visible.rename(kept)
    log.warning(
        "%s was edited since the run wrote it: resume= continues with the run's own config (.hydra/config.yaml) and "
        "does not read config.yaml; your edit is kept as %s. To train with other settings, start a new run from a "
        "checkpoint: ckpt_path=%s",
        visible, kept.name, run_dir / "checkpoints" / "last.ckpt",
    )  # fmt: skip


def _yaml(path: Path) -> Any:
    """A YAML file of a run directory as OmegaConf reads it, or None: missing, not a plain file (a FIFO would block
    the read), or not YAML."""
    if not path.is_file():
        return None
    try:
        return OmegaConf.load(path)
    except Exception:  # yaml's errors, a duplicate key, bad bytes: not a record this project wrote
        return None


def training_state(path: str, max_epochs: int | None, resume: str | None = None) -> dict[str, Any]:
    """The checkpoint `ckpt_path` names, read and checked once (cnn_exp/checkpoints.py: Lightning's restore gets the
    same object), refused unless it holds a training state of train.py's with epochs left to train."""
    checkpoint = checkpoints.load_once(path)
    _check_state(checkpoint, f"ckpt_path={path}")
    # Past max_epochs Lightning fails with a traceback; at it, it would train nothing (caught after fit).
    if max_epochs is not None and 0 <= max_epochs <= checkpoint["epoch"]:
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


def _check_state(checkpoint: dict[str, Any], where: str) -> None:
    """A training state of train.py's, by its keys (cnn_exp/checkpoints.py's one vocabulary) and their kinds."""
    if checkpoints.missing(checkpoint, checkpoints.MODEL):
        raise UserError(
            f"{where} is not a checkpoint written by train.py (a bare state_dict or another program's file has no "
            "training state to continue from)"
        )
    if checkpoints.missing(checkpoint, ("optimizer_states", "lr_schedulers")):
        raise UserError(
            f"{where} holds weights only (saved with save_weights_only=true): it has no optimizer state to continue "
            f"training from. Test it with test.py {where}, or continue from a checkpoint written by train.py"
        )
    if missing := checkpoints.missing(checkpoint, checkpoints.TRAINING_STATE):
        raise UserError(f"{where} has no {', '.join(missing)}: it is not a training state written by train.py")
    for key in ("epoch", "global_step"):
        if not is_whole(checkpoint[key]) or checkpoint[key] < 0:
            raise UserError(f"{where}: {key}={checkpoint[key]!r} is not a count")
    if not isinstance(checkpoint["loops"], Mapping) or not isinstance(checkpoint["loops"].get("fit_loop"), Mapping):
        raise UserError(f"{where}: loops holds no fit_loop state to continue from")
    if not isinstance(checkpoint.get("callbacks", {}), Mapping):
        raise UserError(f"{where}: callbacks is not a mapping of callback states")


def check_fits(
    checkpoint: dict[str, Any], path: str | Path, model: Classifier, datamodule: Any, callbacks: list[type] = ()
) -> None:
    """Refuse, before training starts, a training state (from `training_state`) that cannot continue this run's.

    Lightning would find each of these only once training has begun, and a refused `resume=` would then leave its
    run marked failed: weights without a training state (Lightning's `save_weights_only=true`), another network,
    optimizer, schedule or dataset than the run's, or states that do not fit them.
    """
    where = f"ckpt_path={path}"
    _check_state(checkpoint, where)
    # The settings first: they say what differs in the user's words (model.channels, optimizer.lr).
    model.check_checkpoint(checkpoint)
    _check_weights(checkpoint["state_dict"], model, where)
    try:
        _check_callback_states(checkpoint.get("callbacks", {}), callbacks)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    optimizer, schedulers = _optimizer_and_schedulers(model)
    _check_optimizer_state(checkpoint["optimizer_states"], optimizer, where)
    _check_scheduler_states(checkpoint["lr_schedulers"], schedulers, where)
    stored, ours = checkpoint.get(build.DATA_TARGET, build.DEFAULT_TARGET["data"]), build.dotted(type(datamodule))
    if stored != ours:
        raise UserError(
            f"{where}: the checkpoint was trained on the data of {stored}, this run's is {ours} (data=...): resume "
            "with the data it was trained on"
        )
    state = checkpoint.get(type(datamodule).__qualname__)
    if state is not None and isinstance(datamodule, InMemoryDataModule):
        if not isinstance(state, Mapping) or not all(is_whole(state.get(k)) for k in ("epoch", "batches")):
            raise UserError(f"{where}: {type(datamodule).__qualname__} holds no data position (epoch, batches)")
        if state.get("dataset") != datamodule.identity:
            raise UserError(
                f"{where}: the checkpoint was trained on {state.get('dataset')}, this run asks for "
                f"{datamodule.identity} (data=...): resume with the data it was trained on"
            )
        # Where the data stands must be where training stood, or the rest of the epoch would be served wrong.
        progress = checkpoint["loops"]["fit_loop"].get("epoch_loop.batch_progress", {})
        trained = progress.get("current", {}).get("processed") if isinstance(progress, Mapping) else None
        if (state["epoch"], state["batches"]) != (checkpoint["epoch"], trained):
            raise UserError(
                f"{where}: its data position (epoch {state['epoch']}, batch {state['batches']}) is not where its "
                f"training stopped (epoch {checkpoint['epoch']}, batch {trained})"
            )


def _check_callback_states(states: Mapping[str, Any], classes: list[type]) -> None:
    """Each state of a callback whose class checks its own (`check_state`: the epoch table's rows, Lookahead's slow
    weights), by its state key (Lightning's: the class's name, with its settings for a ModelCheckpoint)."""
    by_name = {cls.__qualname__: cls for cls in classes if hasattr(cls, "check_state")}
    for key, state in states.items():
        if (cls := by_name.get(str(key).split("{")[0])) is not None:
            cls.check_state(state)


def _check_weights(weights: Any, model: torch.nn.Module, where: str) -> None:
    ours = model.state_dict()
    if not isinstance(weights, Mapping):
        raise UserError(f"{where}: state_dict is not a mapping of weights")
    differences = [
        f"{name}: {checkpoints.shape(weights.get(name))} in the checkpoint, {checkpoints.shape(ours.get(name))} here"
        for name in sorted(set(ours) | set(weights))
        if checkpoints.shape(weights.get(name)) != checkpoints.shape(ours.get(name))
    ]
    if differences:
        more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
        raise UserError(f"{where} holds weights of another network than this run's: {'; '.join(differences[:3])}{more}")


def _optimizer_and_schedulers(model: Classifier) -> tuple[torch.optim.Optimizer, list[Any]]:
    """The optimizer and schedulers the run will train with, built afresh, to load the checkpoint's states into."""
    configured = model.configure_optimizers()
    if isinstance(configured, torch.optim.Optimizer):
        return configured, []
    scheduler = configured["lr_scheduler"]
    return configured["optimizer"], [scheduler["scheduler"] if isinstance(scheduler, dict) else scheduler]


def _check_optimizer_state(states: Any, optimizer: torch.optim.Optimizer, where: str) -> None:
    if not isinstance(states, list | tuple) or len(states) != 1:
        raise UserError(f"{where}: optimizer_states must hold one optimizer's state, the run trains with one")
    state = states[0]
    if not isinstance(state, Mapping) or not isinstance(state.get("param_groups"), list | tuple):
        raise UserError(f"{where}: optimizer_states[0] is not an optimizer's state (param_groups, state)")
    fresh = [dict(group) for group in optimizer.param_groups]
    for index, group in enumerate(state["param_groups"]):
        if not isinstance(group, Mapping):
            raise UserError(f"{where}: optimizer_states[0].param_groups[{index}] is not a mapping of settings")
        for key, value in group.items():
            if (
                index < len(fresh)
                and key != "params"
                and key in fresh[index]
                and not _same_kind(value, fresh[index][key])
            ):
                raise UserError(
                    f"{where}: optimizer_states[0].param_groups[{index}].{key}={value!r} is not of the kind the "
                    f"optimizer takes ({fresh[index][key]!r} here)"
                )
    try:  # torch checks the groups' sizes against the parameters
        optimizer.load_state_dict(dict(state))
    except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as err:
        raise UserError(
            f"{where}: its optimizer state does not fit this run's network: {build.first_line(err)}"
        ) from None
    # torch takes the per-parameter state (momentum, moments) as it comes: its shapes must be the parameters'.
    for number, parameter in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        for name, value in optimizer.state.get(parameter, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != parameter.shape:
                raise UserError(
                    f"{where}: its optimizer state {name} of parameter {number} has shape {list(value.shape)}, "
                    f"the parameter {list(parameter.shape)}"
                )


def _check_scheduler_states(states: Any, schedulers: list[Any], where: str) -> None:
    if not isinstance(states, list | tuple) or len(states) != len(schedulers):
        held = len(states) if isinstance(states, list | tuple) else build.kind(states)
        raise UserError(f"{where}: lr_schedulers holds {held} scheduler states, the run has {len(schedulers)}")
    for scheduler, state in zip(schedulers, states, strict=True):
        fresh = scheduler.state_dict()
        if not isinstance(state, Mapping):
            raise UserError(f"{where}: lr_schedulers[0] is not a scheduler's state")
        # torch copies every key of it onto the scheduler: none may replace a method or the optimizer.
        for key, value in state.items():
            if key not in fresh or not _same_state(value, fresh[key]):
                raise UserError(
                    f"{where}: lr_schedulers[0].{key}={shown(value, 100)} is not a state of {type(scheduler).__name__}"
                )
        # Its numbers must also make a schedule: the learning rate where it stands is computed from them and the
        # optimizer's state (a one-cycle phase of no length divides by zero, a step past its end is refused).
        try:
            scheduler.load_state_dict(dict(state))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's advice to call get_last_lr() instead
                lrs = scheduler.get_lr()
        except NotImplementedError:  # a schedule that computes no rate of its own (ReduceLROnPlateau)
            lrs = []
        except (ArithmeticError, ValueError, KeyError, TypeError, IndexError) as err:
            raise UserError(
                f"{where}: its {type(scheduler).__name__} state does not make a schedule: {build.first_line(err)}"
            ) from None
        if not all(isinstance(lr, int | float) and math.isfinite(lr) and lr >= 0 for lr in lrs):
            raise UserError(f"{where}: its {type(scheduler).__name__} state gives the learning rates {lrs}")


def _same_state(value: Any, ours: Any) -> bool:
    """A scheduler's state value of the kind a fresh one holds, and its names the same: a schedule's names (one-cycle's
    phases name the parameter groups' keys, its annealing is named) come from settings that must already be the same,
    and torch looks them up as it steps."""
    if isinstance(ours, Mapping):
        return (
            isinstance(value, Mapping) and set(value) == set(ours) and all(_same_state(value[k], ours[k]) for k in ours)
        )
    if isinstance(ours, list | tuple) and any(isinstance(item, Mapping) for item in ours):
        return isinstance(value, list | tuple) and len(value) == len(ours) and all(map(_same_state, value, ours))
    if isinstance(ours, str):
        return value == ours
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return _same_kind(value, ours)


def _same_kind(value: Any, ours: Any) -> bool:
    """Plain values of one kind: both bools, both numbers, both strings, lists alike; None matches any."""
    if value is None or ours is None:
        return build.is_plain(value)
    if isinstance(ours, bool) or isinstance(value, bool):
        return isinstance(ours, bool) and isinstance(value, bool)
    if checkpoints.is_scalar(ours):
        return checkpoints.is_scalar(value)
    if isinstance(ours, list | tuple):
        return isinstance(value, list | tuple) and len(value) == len(ours) and all(map(_same_kind, value, ours))
    return type(value) is type(ours) and build.is_plain(value)
