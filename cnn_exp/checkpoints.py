"""Checkpoint files: written atomically, read as data that never decides what code runs or what gets deleted, found
again after a move.

A checkpoint is input. Loading it under torch's `weights_only=True` builds no objects, but what it says still
reaches code that acts: its settings are built into a network, optimizer and schedule, and its callback state names
the files Lightning deletes next. So every path that reads a checkpoint (`load`, also used by Lightning through
`SafeCheckpointIO`) checks both first: settings may name only the classes below, with plain values of the kinds
their parameters take; file names may lie only in the folder the checkpoint's callback saved to.
"""

import inspect
import logging
import os
import pickle
import types
import typing
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import callbacks
from lightning.pytorch.utilities.migration import migrate_checkpoint
from omegaconf import OmegaConf

from cnn_exp import atomic
from cnn_exp.data import MNISTDataModule
from cnn_exp.errors import UserError, is_number, is_whole
from cnn_exp.net import ConvNet

if TYPE_CHECKING:
    from cnn_exp.classifier import Classifier

log = logging.getLogger(__name__)


def _classes(module: types.ModuleType, base: type) -> dict[str, type]:
    """The public subclasses of `base` in `module`, by their public name and by their defining module's."""
    found = {}
    for name in module.__all__:
        cls = getattr(module, name)
        if inspect.isclass(cls) and issubclass(cls, base) and cls is not base:
            found[f"{module.__name__}.{name}"] = found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return found


# The only classes ever built from settings, a config's or a checkpoint's: a `_target_` is looked up here, never
# imported (importing a module named by a file would run its code). Per group: the classes, what they are called
# in messages, and how many leading arguments Classifier passes itself (the parameters, the optimizer).
BUILDS: dict[str, tuple[dict[str, type], str, int]] = {
    "net": ({"cnn_exp.net.ConvNet": ConvNet}, "cnn_exp.net.ConvNet", 0),
    "optimizer": (_classes(torch.optim, torch.optim.Optimizer), "an optimizer of torch.optim, e.g. torch.optim.SGD", 1),
    "scheduler": (
        _classes(torch.optim.lr_scheduler, torch.optim.lr_scheduler.LRScheduler),
        "a scheduler of torch.optim.lr_scheduler, e.g. torch.optim.lr_scheduler.StepLR",
        1,
    ),
}
# The Classifier's settings that are plain values, not things it builds (checked by check_classifier_settings).
CLASSIFIER_SETTINGS = ("label_smoothing", "flip_average")
# Hydra's keys at the top of a settings node, with the kind of value each takes. Any other `_key_`, or one of
# these below the top, would be an instruction to Hydra: settings here are never instantiated, so none may appear.
HOW_TO_BUILD = {"_target_": str, "_partial_": bool, "_convert_": str, "_recursive_": bool}
# The keys of a checkpoint callback's state that name files: Lightning deletes "the previous" one on its next save.
FILE_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")
# What a file may cost before a check can refuse it. A checkpoint of train.py keeps its settings and states in a few
# KB of pickle (data.pkl in torch's zip format) beside its weights, nested a few levels deep; unpickling 20 MB of
# them takes seconds (10 million class names: about 10), and deeper nesting would overflow Python's recursion.
MAX_PICKLE_BYTES = 4 * 2**20
MAX_DEPTH = 32


def load(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """torch.load with `weights_only=True`, then `check`: a crafted file can neither run code nor name one to delete.

    Every way a user's file can be wrong ends in one UserError naming the file: missing, damaged, carrying objects
    that only an unsafe load would build, or settings and file names that `check` refuses.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ckpt_path={path}: no such file (give the path of a .ckpt written by train.py)")
    _check_archive(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err) or "GLOBAL" in str(err):
            raise UserError(
                f"ckpt_path={path} refused: it holds Python objects that loading would have to build by running "
                "code, which a checkpoint written by train.py never does. Do not load it unless you trust its "
                "source (and then not with this tool)."
            ) from None
        raise UserError(f"ckpt_path={path} cannot be read: it is not a checkpoint, or it is damaged") from None
    except Exception as err:  # torch's safe unpickler fails on junk in many ways (KeyError, IndexError, ...)
        raise UserError(f"ckpt_path={path} cannot be read (truncated or damaged?): {_first_line(err)}") from None
    if not isinstance(checkpoint, dict):
        raise UserError(
            f"ckpt_path={path} is not a checkpoint written by train.py: it holds {_kind(checkpoint)}, not a mapping "
            "of its parts (state_dict, hyper_parameters, ...)"
        )
    if _deeper_than(checkpoint, MAX_DEPTH):
        raise UserError(f"ckpt_path={path} refused: it nests values more than {MAX_DEPTH} levels deep (train.py: 6)")
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("pytorch-lightning_version"), str):
        # Lightning upgrades an old checkpoint when it loads one, and an upgrade moves values (a file name among them)
        # into new places: check what Lightning will use. The upgraded checkpoint is not upgraded twice.
        try:
            checkpoint, _ = migrate_checkpoint(checkpoint)
        except Exception as err:
            raise UserError(f"ckpt_path={path} cannot be read: {_first_line(err)}") from None
    try:
        check(checkpoint)
    except UserError as err:
        raise UserError(f"ckpt_path={path} refused: {err}") from None
    return checkpoint


def check(checkpoint: Any) -> None:
    """Refuse a checkpoint whose settings name code, or whose callback state names files outside its own folder.

    Only what Lightning or this project would act on is checked; a file that is no checkpoint at all passes, for the
    caller to refuse with its own words. Raises UserError naming the key path.
    """
    if not isinstance(checkpoint, Mapping):
        return
    # Lightning passes these to the model too (checkpoints of 2020), and wraps the settings in an argument named by
    # *hparams_name: train.py writes neither.
    for key in ("hparams", "module_arguments"):
        if key in checkpoint:
            raise UserError(f"{key}: settings under a key that train.py never writes (it writes hyper_parameters)")
    for key in ("hparams_name", "datamodule_hparams_name"):
        if checkpoint.get(key) not in (None, "kwargs"):
            raise UserError(f"{key}={checkpoint[key]!r}: train.py writes 'kwargs'")
    # Lightning calls a *hparams_type with the settings: a name is harmless, anything else would be called.
    for key in ("hparams_type", "datamodule_hparams_type"):
        if not isinstance(checkpoint.get(key, ""), str):
            raise UserError(f"{key} is not a name: train.py writes none")
    if "hyper_parameters" in checkpoint:
        _check_model_settings(checkpoint["hyper_parameters"], "hyper_parameters")
    if "datamodule_hyper_parameters" in checkpoint:
        settings, where = checkpoint["datamodule_hyper_parameters"], "datamodule_hyper_parameters"
        _refuse_instructions(settings, where, top=False)
        _check_arguments(MNISTDataModule, settings, where, "the DataModule (cnn_exp.data.MNISTDataModule)", 0)
    _check_built_shapes(checkpoint)
    _check_file_names(checkpoint.get("callbacks"))


def _check_archive(path: Path) -> None:
    """torch's zip format, whose pickled part (everything but the weights) is no larger than MAX_PICKLE_BYTES: read
    from the archive's directory, before anything is unpickled."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [entry for entry in archive.infolist() if entry.filename.endswith("/data.pkl")]
    except (zipfile.BadZipFile, OSError, ValueError):
        raise UserError(
            f"ckpt_path={path} cannot be read: it is not a checkpoint (train.py writes torch's zip format), or it "
            "is damaged"
        ) from None
    if len(pickles) != 1:
        raise UserError(f"ckpt_path={path} cannot be read: it is not a checkpoint of torch's (no data.pkl in it)")
    if pickles[0].file_size > MAX_PICKLE_BYTES:
        raise UserError(
            f"ckpt_path={path} refused: its settings and states take {pickles[0].file_size / 2**20:.0f} MB beside "
            f"the weights, more than the {MAX_PICKLE_BYTES // 2**20} MB allowed (train.py writes a few KB)"
        )


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether mappings and lists nest more than `limit` levels deep in `value`; counted without recursion."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping | list | tuple):
            if depth >= limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, Mapping) else item))
    return False


def _check_built_shapes(checkpoint: Mapping[str, Any]) -> None:
    """The network the settings describe has the stored weights' shapes, and one output per class name. Compared on
    torch's meta device, which allocates nothing: settings of a far larger network than the file's weights (a huge
    image_size or hidden) are refused before any memory is asked for."""
    settings, weights = checkpoint.get("hyper_parameters", {}).get("net"), checkpoint.get("state_dict")
    if settings is None or not isinstance(weights, Mapping):
        return
    with torch.device("meta"):
        net = build(settings, "net", where="hyper_parameters.net")
    built = {f"net.{name}": list(value.shape) for name, value in net.state_dict().items()}
    stored = {name: _shape(value) for name, value in weights.items() if str(name).startswith("net.")}
    differences = [
        f"{name}: {stored.get(name, 'none')} stored, {built.get(name, 'none')} built"
        for name in sorted(set(built) | set(stored), key=str)
        if str(stored.get(name, "none")) != str(built.get(name, "none"))
    ]
    if differences:
        more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
        raise UserError(
            f"state_dict holds other weights than hyper_parameters.net describes: {'; '.join(differences[:3])}{more}"
        )
    classes = (checkpoint.get("datamodule_hyper_parameters") or {}).get("classes")
    outputs = getattr(getattr(net, "out", None), "out_features", None)
    if isinstance(classes, list | tuple) and outputs is not None and len(classes) != outputs:
        raise UserError(
            f"datamodule_hyper_parameters.classes names {len(classes)} classes, but the network has {outputs} outputs"
        )


def checked_class(settings: Any, group: str, where: str) -> type:
    """The class that a settings node of `group` (net, optimizer, scheduler) names, once the node has passed.

    It passes when its `_target_` is one of BUILDS[group]'s classes and every other value is plain data of the kind
    its parameter takes (no objects, no Hydra instructions). Raises UserError naming the key path (`where`...).
    """
    allowed, described, supplied = BUILDS[group]
    settings = _plain(settings)
    if not isinstance(settings, Mapping):
        raise UserError(f"{where} must be a mapping of settings, not {_kind(settings)}")
    _refuse_instructions(settings, where, top=True)
    target = settings.get("_target_")
    if not isinstance(target, str) or target not in allowed:
        raise UserError(f"{where}._target_={target} is not a class this project builds from settings ({described})")
    cls = allowed[target]
    values = {key: value for key, value in settings.items() if key not in HOW_TO_BUILD}
    _check_arguments(cls, values, where, target, supplied)
    return cls


def build(settings: Any, group: str, *args: Any, where: str) -> Any:
    """Build a network, optimizer or scheduler from its settings: `checked_class(...)(*args, **values)`.

    The one way Classifier builds them, from a config file or a checkpoint alike: no `hydra.utils.instantiate`,
    which would call whatever a `_target_` names, at any depth.
    """
    cls = checked_class(settings, group, where)
    values = {key: value for key, value in _plain(settings).items() if key not in HOW_TO_BUILD}
    if group == "net" and torch.get_default_device().type != "meta":
        _check_size(cls, values, where)
    return cls(*args, **values)


def _check_size(cls: type, values: dict[str, Any], where: str) -> None:
    """Refuse a network that could not be trained in this machine's memory, measured on torch's meta device first
    (which allocates nothing) instead of failing in the allocator with a traceback."""
    with torch.device("meta"):
        parameters = sum(p.numel() for p in cls(**values).parameters())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    needed = 16 * parameters  # float32 weights, gradients and two optimizer moments
    if needed > memory:
        raise UserError(
            f"{'model' if where == 'model' else where}: the network would have {parameters:,} parameters, "
            f"{needed / 2**30:,.0f} GiB to train (weights, gradients, optimizer state), more than this machine's "
            f"{memory / 2**30:.0f} GiB: use fewer model.channels or model.hidden, or a smaller image_size"
        )


def check_training_state(checkpoint: dict[str, Any], path: str | Path, model: "Classifier", datamodule: Any) -> None:
    """Refuse, before training starts, a checkpoint (from `load`) that cannot continue this run's training.

    Lightning would find each of these only once training has begun, and a refused `resume=` would then leave its
    run marked failed: weights without a training state (Lightning's `save_weights_only=true`), another network,
    optimizer, schedule or dataset than the run's, or states that do not fit them.
    """
    where = f"ckpt_path={path}"
    if "state_dict" in checkpoint and not {"optimizer_states", "lr_schedulers"} <= set(checkpoint):
        raise UserError(
            f"{where} holds weights only (saved with save_weights_only=true): it has no optimizer state to continue "
            f"training from. Test it with test.py {where}, or continue from a checkpoint written by train.py"
        )
    required = ("state_dict", "optimizer_states", "lr_schedulers", "loops", "epoch", "global_step")
    if missing := [key for key in (*required, "pytorch-lightning_version") if key not in checkpoint]:
        raise UserError(f"{where} has no {', '.join(missing)}: it is not a training state written by train.py")
    for key in ("epoch", "global_step"):
        if not is_whole(checkpoint[key]) or checkpoint[key] < 0:
            raise UserError(f"{where}: {key}={checkpoint[key]!r} is not a count")
    if not isinstance(checkpoint["loops"], Mapping) or not isinstance(checkpoint["loops"].get("fit_loop"), Mapping):
        raise UserError(f"{where}: loops holds no fit_loop state to continue from")
    if not isinstance(checkpoint.get("callbacks", {}), Mapping):
        raise UserError(f"{where}: callbacks is not a mapping of callback states")
    # The settings first: they say what differs in the user's words (model.channels, optimizer.lr).
    model.check_checkpoint(checkpoint)
    _check_weights(checkpoint["state_dict"], model, where)
    optimizer, schedulers = _optimizer_and_schedulers(model)
    _check_optimizer_state(checkpoint["optimizer_states"], optimizer, where)
    _check_scheduler_states(checkpoint["lr_schedulers"], schedulers, where)
    state = checkpoint.get(type(datamodule).__qualname__)
    if state is not None:
        if not isinstance(state, Mapping) or not all(is_whole(state.get(k)) for k in ("epoch", "batches")):
            raise UserError(f"{where}: {type(datamodule).__qualname__} holds no data position (epoch, batches)")
        if state.get("dataset") != datamodule.hparams.dataset:
            raise UserError(
                f"{where}: the checkpoint was trained on {state.get('dataset')}, this run asks for "
                f"{datamodule.hparams.dataset} (data=...): resume with the data it was trained on"
            )


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O, made atomic where it counts, safe to load, and unable to delete anything else.

    Lightning writes through a temporary file in the system's temp folder and moves it into place: a copy, not
    a rename, when outputs/ lives on another filesystem (a cluster's shared disk), so a kill can still leave half
    a file. Here the temporary file sits beside the target and is renamed over it after an fsync.

    Lightning deletes "the previous checkpoint" by a name that a checkpoint's callback state supplied, with its own
    check done on the name as written (so `..` or a link inside the folder leads elsewhere), and recursively. Here
    only a file in a folder this run saved a checkpoint into is ever removed; that holds for every checkpoint
    callback, Lightning's default one (callbacks=none) included.
    """

    def __init__(self) -> None:
        super().__init__()
        self._folders: set[Path] = set()  # where this process saved checkpoints, links resolved

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        try:
            with atomic.replace(path, "wb") as f:
                torch.save(checkpoint, f)
        except OSError as err:  # a full disk, a quota, a read-only mount: the previous checkpoint is still whole
            raise UserError(
                f"cannot write the checkpoint {path}: {err.strerror or err}. Its previous version is whole: make room "
                f"(or make it writable), then continue the run with resume={Path(path).parent.parent}"
            ) from err
        self._folders.add(Path(path).parent.resolve())

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> Any:
        return load(path, map_location=map_location or "cpu")

    def remove_checkpoint(self, path: str | Path) -> None:
        entry = Path(path)
        if entry.name in ("", ".", "..") or entry.parent.resolve() not in self._folders:
            log.warning(
                "kept %s: it is not in a folder this run saves checkpoints to, so it is not ours to delete", path
            )
        elif entry.is_dir() and not entry.is_symlink():
            log.warning("kept %s: a folder, not a checkpoint file", path)
        elif entry.is_symlink() or entry.exists():
            entry.unlink()  # a link goes, never what it points to


class ModelCheckpoint(callbacks.ModelCheckpoint):
    """Lightning's ModelCheckpoint, with last.ckpt written at every epoch's end, restored state that may name only
    files in its own folder, and a run that was moved, then resumed, finding its files again.

    Lightning 2.6 rewrites last.ckpt only when it saved another checkpoint at that step: with a validation split,
    only when the monitored metric improved. last.ckpt then held the best epoch, not the newest, and a run continued
    from it trained some epochs twice. Here it is rewritten at the end of every epoch (and every validation).
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_due(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_due(trainer)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Point the state of a moved run at where its files lie now.

        Its state names files by absolute path. Lightning drops that state when the folder differs, and the resumed
        run would then rank its epochs afresh: test a worse epoch as the best one and write last-v1.ckpt beside a
        stale last.ckpt.
        """
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

        for key in FILE_KEYS:
            if state.get(key):
                state[key] = here(state[key])
        state["best_k_models"] = {here(path): score for path, score in state.get("best_k_models", {}).items()}
        state["dirpath"] = self.dirpath

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning's restore, keeping only names of files in this callback's folder, links and `..` resolved."""
        ours = state_dict.get("dirpath") == self.dirpath
        super().load_state_dict(state_dict)
        if not ours:
            # Another run's state (train.py ckpt_path=): this run ranks its own files afresh and names no other.
            self.best_model_path = ""
            return
        for key in FILE_KEYS:
            if getattr(self, key) and not self._own(getattr(self, key)):
                log.warning("the checkpoint's %s=%s lies outside %s: dropped", key, getattr(self, key), self.dirpath)
                setattr(self, key, "")
        if self.save_last and not self.last_model_path:  # else Lightning, finding last.ckpt, writes last-v1.ckpt
            self.last_model_path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)
        for path in [path for path in self.best_k_models if not self._own(path)]:
            log.warning("the checkpoint's best_k_models names %s, outside %s: dropped", path, self.dirpath)
            del self.best_k_models[path]
        # Lightning looks the k-th best up among best_k_models: the two must agree, or its next save fails.
        if self.monitor and self.best_k_models:
            ranked = sorted(self.best_k_models, key=lambda path: float(self.best_k_models[path]))
            best, worst = (ranked[0], ranked[-1]) if self.mode == "min" else (ranked[-1], ranked[0])
            if self.kth_best_model_path not in self.best_k_models:
                self.kth_best_model_path, self.kth_value = worst, self.best_k_models[worst]
            if self.best_model_path not in self.best_k_models:
                self.best_model_path, self.best_model_score = best, self.best_k_models[best]
        elif self.monitor:
            self.best_model_path = self.kth_best_model_path = ""
            self.best_model_score = None
            self.kth_value = torch.tensor(torch.inf if self.mode == "min" else -torch.inf)

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        # Lightning checks the folder on the name as written, where `..` or a link can lead out of it.
        if not self._own(filepath):
            log.warning("kept %s: it lies outside %s, so it is not this callback's to delete", filepath, self.dirpath)
            return
        super()._remove_checkpoint(trainer, filepath)

    def _own(self, path: str) -> bool:
        """Whether `path` names an entry of this callback's folder (or below it), once links and `..` are resolved."""
        entry = Path(path)
        if not self.dirpath or entry.name in ("", ".", ".."):
            return False
        return entry.parent.resolve().is_relative_to(Path(self.dirpath).resolve())

    def _save_last_if_due(self, trainer: L.Trainer) -> None:
        # Lightning's skip: not fitting, a sanity check, fast_dev_run, or a checkpoint (last.ckpt with it) written
        # at this very step already.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def check_classifier_settings(settings: Mapping[str, Any], where: str = "classifier") -> None:
    """The Classifier's own plain settings (CLASSIFIER_SETTINGS), from a config or a checkpoint."""
    smoothing = settings.get("label_smoothing", 0.0)
    if not is_number(smoothing) or not 0 <= smoothing < 1:
        raise UserError(f"{where}.label_smoothing={smoothing!r} must be a number at least 0 and below 1")
    if not isinstance(settings.get("flip_average", False), bool):
        raise UserError(f"{where}.flip_average={settings['flip_average']!r} must be true or false")


def _check_model_settings(settings: Any, where: str) -> None:
    if not isinstance(settings, Mapping):
        raise UserError(f"{where} must be a mapping of the model's settings, not {_kind(settings)}")
    for key, value in settings.items():
        if key in CLASSIFIER_SETTINGS:
            continue
        if key not in BUILDS:
            known = ", ".join([*BUILDS, *CLASSIFIER_SETTINGS])
            raise UserError(f"{where}.{key} is not a setting of the model (it takes {known})")
        if key != "scheduler" or value:  # no scheduler: null or an empty mapping
            checked_class(value, key, f"{where}.{key}")
    check_classifier_settings(settings, where)


def _refuse_instructions(value: Any, where: str, top: bool) -> None:
    """Refuse Hydra's `_key_` instructions anywhere in `value`, but the known ones at its top when `top`."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise UserError(f"{where} has a key {key!r} that is not a name")
            if key.startswith("_") and key.endswith("_") and len(key) > 2:
                if not (top and key in HOW_TO_BUILD):
                    raise UserError(
                        f"{where}.{key} is an instruction to build or call something, which settings never hold"
                    )
                if not isinstance(item, HOW_TO_BUILD[key]):
                    raise UserError(f"{where}.{key}={item!r} is not a {HOW_TO_BUILD[key].__name__}")
            _refuse_instructions(item, f"{where}.{key}", top=False)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _refuse_instructions(item, f"{where}[{index}]", top=False)


def _check_arguments(cls: type, values: Any, where: str, name: str, supplied: int) -> None:
    """Every value is a keyword argument of `cls` (past the `supplied` leading ones) and of the kind it takes."""
    if not isinstance(values, Mapping):
        raise UserError(f"{where} must be a mapping of settings, not {_kind(values)}")
    parameters = list(inspect.signature(cls).parameters.values())[supplied:]
    keywords = {p.name: p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not resolve (torch's LambdaLR): each parameter's default's kind
        hints = {}
    for key, value in values.items():
        if key not in keywords:
            raise UserError(f"{where}.{key} is not a setting of {name}")
        parameter = keywords[key]
        hint = hints.get(key)
        if hint is None and parameter.default not in (parameter.empty, None):
            hint = type(parameter.default)
        elif hint is None and parameter.annotation is not parameter.empty:
            raise UserError(f"{where}.{key}={value!r} is not something settings can hold ({parameter.annotation})")
        if not _fits(value, Any if hint is None else hint):
            raise UserError(f"{where}.{key}={value!r} is not {_describe(hint)}")


def _fits(value: Any, hint: Any) -> bool:
    """Whether `value` is plain data of the kind a type hint names. A tensor, callable or object never is."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return _is_plain(value)
    if hint in (None, type(None)):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is typing.Literal:
        return any(type(value) is type(arg) and value == arg for arg in args)
    if hint in (bool, int, float, str):
        return {bool: isinstance(value, bool), int: is_whole(value), float: is_number(value)}.get(
            hint, isinstance(value, str)
        )
    if (origin or hint) in (list, tuple, Sequence, Iterable):
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(_fits, value, args))
        return all(_fits(item, args[0] if args else Any) for item in value)
    return False


def _is_plain(value: Any) -> bool:
    """None, a bool, number or string, or a list of them."""
    if isinstance(value, list | tuple):
        return all(_is_plain(item) for item in value)
    return value is None or isinstance(value, bool | int | float | str)


def _describe(hint: Any) -> str:
    """A type hint in words, leaving out what settings never hold (tensors)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args if arg is not torch.Tensor)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)} values, each {_describe(args[0])}"
    if (origin or hint) in (list, tuple, Sequence, Iterable):
        return f"a list, each {_describe(args[0])}" if args else "a list"
    words = {
        Any: "plain data (numbers, strings, lists of them)",
        None: "null",
        type(None): "null",
        bool: "true or false",
    }
    words |= {int: "a whole number", float: "a number", str: "a string"}
    return words.get(hint, f"something settings cannot hold ({getattr(hint, '__name__', hint)})")


def _check_file_names(states: Any) -> None:
    """Each checkpoint callback's state may name only files in the folder it records as its own (as written: no `..`,
    no other filesystem). Where that folder is now, and links in it, are resolved when the state is used."""
    if states is None:
        return
    if not isinstance(states, Mapping):
        raise UserError(f"callbacks must be a mapping of callback states, not {_kind(states)}")
    for key, state in states.items():
        if not isinstance(state, Mapping) or not {"dirpath", "best_k_models", *FILE_KEYS} & set(state):
            continue
        where, folder = f"callbacks.{getattr(key, '__name__', key)}", state.get("dirpath")
        ranked = state.get("best_k_models") or {}
        if not isinstance(ranked, Mapping):
            raise UserError(f"{where}.best_k_models is not a mapping of file names to scores")
        named = {f"{where}.{name}": state.get(name) for name in FILE_KEYS}
        named |= {f"{where}.best_k_models[{path!r}]": path for path in ranked}
        scores = {f"{where}.{name}": state.get(name) for name in ("best_model_score", "current_score", "kth_value")}
        scores |= {f"{where}.best_k_models[{path!r}]": score for path, score in ranked.items()}
        for name, score in scores.items():
            if score is not None and not _is_scalar(score):
                raise UserError(f"{name}={score!r} is not a score")
        for name, path in named.items():
            if path in (None, ""):
                continue
            if not isinstance(folder, str):
                raise UserError(f"{name}={path!r} names a file, but {where} records no folder it saved to")
            if not (isinstance(path, str) and _lies_in(path, folder)):
                raise UserError(
                    f"{name}={path!r} lies outside {folder!r}, the folder this callback saved to: a checkpoint may "
                    "name only its own run's checkpoint files"
                )


def _lies_in(path: str, folder: str) -> bool:
    """Whether `path`, as written, names an entry below the absolute `folder`: no `.` or `..` steps, no URL."""
    normal = os.path.isabs(folder) and os.path.normpath(folder) == folder and os.path.normpath(path) == path
    return normal and path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_weights(weights: Any, model: torch.nn.Module, where: str) -> None:
    ours = model.state_dict()
    if not isinstance(weights, Mapping):
        raise UserError(f"{where}: state_dict is not a mapping of weights")
    differences = [
        f"{name}: {_shape(weights.get(name))} in the checkpoint, {_shape(ours.get(name))} here"
        for name in sorted(set(ours) | set(weights))
        if _shape(weights.get(name)) != _shape(ours.get(name))
    ]
    if differences:
        more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
        raise UserError(f"{where} holds weights of another network than this run's: {'; '.join(differences[:3])}{more}")


def _shape(value: Any) -> str:
    if value is None:
        return "none"
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else _kind(value)


def _optimizer_and_schedulers(model: "Classifier") -> tuple[torch.optim.Optimizer, list[Any]]:
    """The optimizer and schedulers the run will train with, built afresh, to load the checkpoint's states into."""
    configured = model.configure_optimizers()
    if isinstance(configured, torch.optim.Optimizer):
        return configured, []
    return configured["optimizer"], [configured["lr_scheduler"]]


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
        raise UserError(f"{where}: its optimizer state does not fit this run's network: {_first_line(err)}") from None
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
        held = len(states) if isinstance(states, list | tuple) else _kind(states)
        raise UserError(f"{where}: lr_schedulers holds {held} scheduler states, the run has {len(schedulers)}")
    for scheduler, state in zip(schedulers, states, strict=True):
        fresh = scheduler.state_dict()
        if not isinstance(state, Mapping):
            raise UserError(f"{where}: lr_schedulers[0] is not a scheduler's state")
        # torch copies every key of it onto the scheduler: none may replace a method or the optimizer.
        for key, value in state.items():
            if key not in fresh or not _same_kind(value, fresh[key]):
                raise UserError(
                    f"{where}: lr_schedulers[0].{key}={value!r} is not a state of {type(scheduler).__name__}"
                )


def _same_kind(value: Any, ours: Any) -> bool:
    """Plain values of one kind: both bools, both numbers, both strings, lists alike; None matches any."""
    if value is None or ours is None:
        return _is_plain(value)
    if isinstance(ours, bool) or isinstance(value, bool):
        return isinstance(ours, bool) and isinstance(value, bool)
    if _is_scalar(ours):
        return _is_scalar(value)
    if isinstance(ours, list | tuple):
        return isinstance(value, list | tuple) and len(value) == len(ours) and all(map(_same_kind, value, ours))
    return type(value) is type(ours) and _is_plain(value)


def _is_scalar(value: Any) -> bool:
    """A number, or a tensor holding one (Lightning keeps scores as tensors)."""
    return is_number(value) or (isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex())


def _plain(settings: Any) -> Any:
    return OmegaConf.to_container(settings, resolve=True) if OmegaConf.is_config(settings) else settings


def _kind(value: Any) -> str:
    return f"a {type(value).__name__}"


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
