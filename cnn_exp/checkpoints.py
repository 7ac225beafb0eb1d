"""Checkpoint files, the format's one owner: written atomically, read as data that never decides what code runs or what
gets deleted, each file read once.

A checkpoint is input. Loading it under torch's `weights_only=True` builds no objects, but what it says still
reaches code that acts: its settings are built into a network, optimizer and schedule, and its callback state names
the files Lightning deletes next. So every path that reads a checkpoint (`load`, also used by Lightning through
`SafeCheckpointIO`) checks both first: settings may name only the classes cnn_exp/build.py builds, with plain values
of the kinds their parameters take; file names may lie only in the folder the checkpoint's callback saved to.
Whether a checkpoint can continue a run's training is resume.py's to decide.
"""

import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.utilities.migration import migrate_checkpoint

from cnn_exp import atomic, build, precision
from cnn_exp.errors import UserError, first_line, is_number

log = logging.getLogger(__name__)

# What train.py writes, the one vocabulary for "is this a checkpoint of train.py's": a model (its settings and weights),
# the data settings it was trained with, and the training state that training continues from. Lightning's
# save_weights_only=true writes the first two without the third.
MODEL = ("hyper_parameters", "state_dict")
DATA = ("datamodule_hyper_parameters",)
TRAINING_STATE = ("optimizer_states", "lr_schedulers", "loops", "epoch", "global_step", "pytorch-lightning_version")

# The training steps' mean losses that the epoch's train loss had not yet added up when the checkpoint was taken
# (cnn_exp/classifier.py), with each step's images: {"losses": 1-D float tensor, "images": 1-D int64 tensor}.
PENDING_LOSSES = "pending_train_losses"
# train.py keeps fewer than 32 steps pending; more, or more images than this, would only cost memory when added up.
MAX_PENDING_STEPS, MAX_PENDING_IMAGES = 1024, 2**24

# The keys of a checkpoint callback's state that name files: Lightning deletes "the previous" one on its next save.
FILE_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")
# What a file may cost before a check can refuse it. A checkpoint of train.py keeps its settings and states in a few
# KB of pickle (data.pkl in torch's zip format) beside its weights, nested a few levels deep; unpickling 20 MB of
# them takes seconds (10 million class names: about 10), and deeper nesting would overflow Python's recursion.
MAX_PICKLE_BYTES = 4 * 2**20
MAX_DEPTH = 32
# Values counted along every path, as any walk over them goes: a pickle may refer to one list many times, so that a
# few KB hold 1000**5 paths. train.py writes a few hundred, and about ten more an epoch (epochs.csv's rows).
MAX_VALUES = 2**18


def load(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """torch.load with `weights_only=True`, then `check`: a crafted file can neither run code nor name one to delete.

    Every way a user's file can be wrong ends in one UserError naming the file: missing, damaged, carrying objects
    that only an unsafe load would build, or settings and file names that `check` refuses.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ckpt_path={path}: no such file (give the path of a .ckpt written by train.py)")
    key = _identity(path)
    if key in _checked and map_location in (None, "cpu"):
        return _checked.pop(key)  # read and checked a moment ago (resume.py), now for Lightning to restore
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
        raise UserError(f"ckpt_path={path} cannot be read (truncated or damaged?): {first_line(err)}") from None
    if not isinstance(checkpoint, dict):
        raise UserError(
            f"ckpt_path={path} is not a checkpoint written by train.py: it holds {build.kind(checkpoint)}, not a "
            "mapping of its parts (state_dict, hyper_parameters, ...)"
        )
    try:
        _check_values(checkpoint, path.stat().st_size)
    except UserError as err:
        raise UserError(f"ckpt_path={path} refused: {err}") from None
    if isinstance(checkpoint.get("pytorch-lightning_version"), str):
        # Lightning upgrades an old checkpoint when it loads one, and an upgrade moves values (a file name among them)
        # into new places: check what Lightning will use. The upgraded checkpoint is not upgraded twice.
        try:
            checkpoint, _ = migrate_checkpoint(checkpoint)
        except Exception as err:
            raise UserError(f"ckpt_path={path} cannot be read: {first_line(err)}") from None
    try:
        check(checkpoint)
    except UserError as err:
        raise UserError(f"ckpt_path={path} refused: {err}") from None
    return checkpoint


def load_once(path: str | Path) -> dict[str, Any]:
    """`load`, and the checked checkpoint kept for the next `load` of the same unchanged file (Lightning's restore
    through SafeCheckpointIO), which then neither reads nor checks it again. One file is kept, and handed out once."""
    checkpoint = load(path)
    keep(path, checkpoint)
    return checkpoint


def keep(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Keep `checkpoint`, just read from `path` by `load`, for the next `load` of the same unchanged file."""
    _checked.clear()
    _checked[_identity(Path(path))] = checkpoint


# The one checkpoint `load_once` keeps, by the identity of its file when it was read.
_checked: dict[tuple[str, int, int, int], dict[str, Any]] = {}


def _identity(path: Path) -> tuple[str, int, int, int]:
    """A file as it is now: where it is, and its inode, size and modification time (a rewrite changes them)."""
    stat = path.stat()
    return str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns


def missing(checkpoint: Mapping[str, Any], keys: tuple[str, ...]) -> list[str]:
    """The keys of `keys` (MODEL, DATA, TRAINING_STATE) that `checkpoint` lacks."""
    return [key for key in keys if key not in checkpoint]


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
        build.check_model_settings(checkpoint["hyper_parameters"], "hyper_parameters")
    if "datamodule_hyper_parameters" in checkpoint:
        build.data_class(checkpoint)  # a DataModule a config of the run names, checked before any import
    weights = checkpoint.get("state_dict", {})
    if not isinstance(weights, Mapping) or not all(
        isinstance(name, str) and isinstance(value, torch.Tensor) for name, value in weights.items()
    ):
        raise UserError("state_dict is not a mapping of names to tensors, as a network's state_dict is")
    precision.trained_in(checkpoint)
    pending_losses(checkpoint)
    _check_built_shapes(checkpoint)
    _check_file_names(checkpoint.get("callbacks"))


def pending_losses(checkpoint: Mapping[str, Any]) -> list[tuple[torch.Tensor, int]]:
    """The checkpoint's pending training losses as (mean loss, images) per step, checked; none if it holds none."""
    pending = checkpoint.get(PENDING_LOSSES)
    if pending is None:
        return []
    losses, images = (pending.get(key) if isinstance(pending, Mapping) else None for key in ("losses", "images"))
    if not (
        isinstance(losses, torch.Tensor)
        and losses.is_floating_point()
        and losses.dim() == 1
        and isinstance(images, torch.Tensor)
        and images.dtype == torch.int64
        and images.shape == losses.shape
        and bool((images > 0).all())
        and len(images) <= MAX_PENDING_STEPS
        and bool((images <= MAX_PENDING_IMAGES).all())  # then their sum cannot overflow
        and int(images.sum()) <= MAX_PENDING_IMAGES
    ):
        raise UserError(
            f"{PENDING_LOSSES} is not a list of training steps' losses and image counts ({shape(losses)} losses, "
            f"{shape(images)} counts): train.py writes one float and one positive count per step, for fewer than 32 "
            "steps"
        )
    return list(zip(losses.unbind(), images.tolist(), strict=True))


def _check_archive(path: Path) -> None:
    """torch's zip format, whose pickled part (everything but the weights) is no larger than MAX_PICKLE_BYTES: read
    from the archive's directory, before anything is unpickled."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
        pickles = [entry for entry in entries if entry.filename.endswith("/data.pkl")]
    except (zipfile.BadZipFile, OSError, ValueError):
        raise UserError(
            f"ckpt_path={path} cannot be read: it is not a checkpoint (train.py writes torch's zip format), or it "
            "is damaged"
        ) from None
    if len(pickles) != 1:
        raise UserError(f"ckpt_path={path} cannot be read: it is not a checkpoint of torch's (no data.pkl in it)")
    if any(entry.compress_type != zipfile.ZIP_STORED for entry in entries):
        raise UserError(
            f"ckpt_path={path} refused: its parts are compressed, which torch.save never does (a file of a few MB "
            "could unpack into gigabytes)"
        )
    if pickles[0].file_size > MAX_PICKLE_BYTES:
        raise UserError(
            f"ckpt_path={path} refused: its settings and states take {pickles[0].file_size / 2**20:.0f} MB beside "
            f"the weights, more than the {MAX_PICKLE_BYTES // 2**20} MB allowed (train.py writes a few KB)"
        )


def _check_values(checkpoint: Any, file_bytes: int) -> None:
    """Refuse values that would cost more to use than the file's size: nesting deeper than MAX_DEPTH, more than
    MAX_VALUES values, and tensors other than plain dense ones whose numbers the file holds (none on torch's meta
    device, sparse, quantized, nested or complex), their bytes together no more than the file's (a tensor expanded
    from one number, or one storage referred to many times, would be copied out at its full size). Counted without
    recursion."""
    stack, values, tensor_bytes = [(checkpoint, 0, "")], 0, 0
    while stack:
        item, depth, where = stack.pop()
        values += 1
        if values > MAX_VALUES:
            raise UserError(f"it holds more than {MAX_VALUES:,} values (train.py writes a few hundred)")
        if isinstance(item, torch.Tensor):
            if item.layout != torch.strided or item.is_meta or item.is_quantized or item.is_nested or item.is_complex():
                kind = "complex" if item.is_complex() else "meta" if item.is_meta else str(item.layout).split(".")[-1]
                raise UserError(f"{where or 'it'} is a {kind} tensor: train.py writes dense real numbers only")
            tensor_bytes += item.numel() * item.element_size()
        elif isinstance(item, Mapping | list | tuple):
            if depth >= MAX_DEPTH:
                raise UserError(f"it nests values more than {MAX_DEPTH} levels deep (train.py: 6)")
            children = list(item.items() if isinstance(item, Mapping) else enumerate(item))
            for key, child in children:
                # Named by keys that are names or numbers; any other key is a value too (a tuple nesting shared
                # tuples would make its text, or its walk, exponentially long).
                name = key if isinstance(key, str | int) else f"<{type(key).__name__} key>"
                label = f"{where}.{name}" if where else str(name)
                stack.append((child, depth + 1, label))
                if isinstance(item, Mapping) and not isinstance(key, str | int):
                    stack.append((key, depth + 1, label))
    if tensor_bytes > file_bytes + 2**20:
        raise UserError(
            f"its tensors hold {tensor_bytes / 2**20:,.0f} MB of numbers, more than the file's "
            f"{file_bytes / 2**20:,.1f} MB (train.py writes each number once)"
        )


def _check_built_shapes(checkpoint: Mapping[str, Any]) -> None:
    """The network the settings describe has the stored weights' shapes, and one output per class name. Compared on
    torch's meta device, which allocates nothing: settings of a far larger network than the file's weights (a huge
    image_size or hidden) are refused before any memory is asked for."""
    settings, weights = checkpoint.get("hyper_parameters", {}).get("net"), checkpoint.get("state_dict")
    if settings is None or not isinstance(weights, Mapping):
        return
    with torch.device("meta"):
        net = build.build(settings, "net", where="hyper_parameters.net")
    built = {f"net.{name}": value for name, value in net.state_dict().items()}
    stored = {name: value for name, value in weights.items() if name.startswith("net.")}
    differences = [
        f"{name}: {shape(stored.get(name))} stored, {shape(built.get(name))} built"
        for name in sorted(set(built) | set(stored))
        if shape(stored.get(name)) != shape(built.get(name))
    ]
    # Of the kind built (weights in any floating-point precision: 64-true trains in float64; batch norm's counts).
    differences += [
        f"{name}: {stored[name].dtype} stored, {built[name].dtype} built"
        for name in sorted(set(built) & set(stored))
        if stored[name].is_floating_point() != built[name].is_floating_point()
    ]
    if differences:
        more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
        raise UserError(
            f"state_dict holds other weights than hyper_parameters.net describes: {'; '.join(differences[:3])}{more}"
        )
    classes = (checkpoint.get("datamodule_hyper_parameters") or {}).get("classes")
    outputs = getattr(net, "num_classes", None)
    if isinstance(classes, list | tuple) and outputs is not None and len(classes) != outputs:
        raise UserError(
            f"datamodule_hyper_parameters.classes names {len(classes)} classes, but the network has {outputs} outputs"
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
        except (OSError, RuntimeError) as err:  # a full disk, a quota, a read-only mount: the previous one is whole
            # torch's zip writer reports a failed write as a RuntimeError raised while the OSError was handled.
            cause = err if isinstance(err, OSError) else err.__context__
            if not isinstance(cause, OSError):
                raise
            raise UserError(
                f"cannot write the checkpoint {path}: {cause.strerror or cause}. Its previous version is whole: make "
                f"room (or make it writable), then continue the run with resume={Path(path).parent.parent}"
            ) from err
        self._folders.add(Path(path).parent.resolve())

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> Any:
        return load(path, map_location=map_location or "cpu")  # once: see load_once

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


def _check_file_names(states: Any) -> None:
    """Each checkpoint callback's state may name only files in the folder it records as its own (as written: no `..`,
    no other filesystem). Where that folder is now, and links in it, are resolved when the state is used."""
    if states is None:
        return
    if not isinstance(states, Mapping):
        raise UserError(f"callbacks must be a mapping of callback states, not {build.kind(states)}")
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
            if score is not None and not is_scalar(score):
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


def shape(value: Any) -> str:
    if value is None:
        return "none"
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else build.kind(value)


def is_scalar(value: Any) -> bool:
    """A number, or a tensor holding one (Lightning keeps scores as tensors)."""
    return is_number(value) or (isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex())


def __getattr__(name: str) -> Any:
    """Run directories started before ModelCheckpoint moved to cnn_exp/callbacks.py name it here in their
    .hydra/config.yaml, which a resume builds: it still resolves."""
    if name == "ModelCheckpoint":
        from cnn_exp.callbacks import ModelCheckpoint

        return ModelCheckpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
