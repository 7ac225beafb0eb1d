"""Building a network, optimizer and schedule from plain settings: the only classes ever built, and the checks of
their values.

Settings come from a config (conf/, the command line) or from a checkpoint, which is input from outside: the same
rule serves both. A `_target_` is looked up in BUILDS, never imported (importing a module a file names would run its
code), and every other value must be plain data of the kind its parameter takes; no `hydra.utils.instantiate`, which
would call whatever a `_target_` names, at any depth. The Classifier builds through `build`; cnn_exp/checkpoints.py
checks a checkpoint's settings with `check_model_settings` and `check_arguments` before anything in it is used.
"""

import copy
import inspect
import logging
import os
import types
import typing
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from cnn_exp import sweep
from cnn_exp.data import MNISTDataModule
from cnn_exp.errors import UserError, first_line, is_number, is_whole, plain
from cnn_exp.folder import FolderDataModule
from cnn_exp.muon import ConvMuon
from cnn_exp.net import ConvNet


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
    "net": ({}, "a model class (trusted_class)", 0),
    "optimizer": (
        {**_classes(torch.optim, torch.optim.Optimizer), "cnn_exp.muon.ConvMuon": ConvMuon},
        "an optimizer of torch.optim, e.g. torch.optim.SGD, or cnn_exp.muon.ConvMuon",
        1,
    ),
    "scheduler": (
        _classes(torch.optim.lr_scheduler, torch.optim.lr_scheduler.LRScheduler),
        "a scheduler of torch.optim.lr_scheduler, e.g. torch.optim.lr_scheduler.StepLR",
        1,
    ),
}
# What the Classifier builds from its settings (hyper_parameters in a checkpoint).
MODEL_GROUPS = ("net", "optimizer", "scheduler")
# The Classifier's settings that are plain values, not things it builds (checked by check_classifier_settings).
CLASSIFIER_SETTINGS = ("label_smoothing", "flip_average", "shift_average", "norm_lr_scale", "norm_weight_decay")
# Schedules over the run's steps, stepped after every batch, not every epoch: per class, the settings of their peak
# (max_lr) and length (total_steps) that, when None, take each parameter group's own lr and the run's optimizer steps.
SCHEDULE_FROM_RUN = {"torch.optim.lr_scheduler.OneCycleLR": ("max_lr", "total_steps")}
# The largest classifier.shift_average, in pixels: test-time shifts are small moves, not crops.
MAX_SHIFT = 4
# Hydra's keys at the top of a settings node, with the kind of value each takes. Any other `_key_`, or one of
# these below the top, would be an instruction to Hydra: settings here are never instantiated, so none may appear.
# `_partial_` is no longer in conf/ (nothing here used it), but checkpoints written with it still load.
HOW_TO_BUILD = {"_target_": str, "_partial_": bool, "_convert_": str, "_recursive_": bool}
# What a model must offer besides forward(images) -> logits (docs/extend.md#your-network): the C×H×W of one image it
# takes, and how many classes it scores.
MODEL_INTERFACE = {
    "input_shape": "the C×H×W of one image, e.g. (1, 28, 28)",
    "num_classes": "how many classes it scores",
}
# What a DataModule must offer besides Lightning's hooks (docs/extend.md#your-data): its class names, in label order,
# and the C×H×W of the images it serves. predict= also asks for PREDICT_INTERFACE.
DATA_INTERFACE = {
    "classes": "its class names, in label order",
    "input_shape": "the C×H×W of one image it serves",
    "test_dataloader": "the test images, which train.py tests on and test.py rebuilds it for",
}
PREDICT_INTERFACE = {
    "load_image": "load_image(image, name) -> C×H×W tensor, values 0 to 1: a Pillow image as the data holds images",
    "normalize": "normalize(images) -> images as the network takes them",
}
# Model settings that null (conf/'s models, by their schema) takes from the data: one image's shape, the classes.
FROM_DATA = ("in_channels", "image_size", "num_classes")
# The classes built without a config naming them, per trusted group; a checkpoint's data settings without a
# _target_ (written before DataModules were named) are MNIST's.
BUILTIN: dict[str, dict[str, type]] = {
    "model": {"cnn_exp.net.ConvNet": ConvNet},
    "data": {"cnn_exp.data.MNISTDataModule": MNISTDataModule, "cnn_exp.folder.FolderDataModule": FolderDataModule},
}
DEFAULT_TARGET = {"data": "cnn_exp.data.MNISTDataModule"}
# The checkpoint key that names the DataModule class of datamodule_hyper_parameters (Lightning names none; a
# checkpoint without it is MNIST's).
DATA_TARGET = "datamodule_target"
_KINDS = {"model": (torch.nn.Module, "a torch.nn.Module"), "data": (L.LightningDataModule, "a LightningDataModule")}
# Classes beyond BUILTIN this process may build, by dotted name: named by trusted input only, a config of the run
# (conf/, a config directory on Hydra's search path, the command line) or Python code (`cnn_exp.load(models=)`).
_trusted: dict[str, set[str]] = {"model": set(), "data": set()}


def trust(group: str, target: str) -> None:
    """Let this process build the `group` ("model", "data") class `target`, which trusted input named."""
    _trusted[group].add(target)


def trusted_class(group: str, target: Any, where: str) -> type:
    """The model or DataModule class `target` names, imported only if trusted input names it: a BUILTIN class, one
    `trust` was given, or one that an option of the group in the running Hydra app names (its `model/*.yaml` or
    `data/*.yaml` on the search path). Any other name, from a checkpoint say, is refused before its module is
    imported: importing runs its code."""
    builtin, (base, kind) = BUILTIN[group], _KINDS[group]
    if isinstance(target, str) and target in builtin:
        return builtin[target]
    named = _trusted[group] | _configured(group) if isinstance(target, str) else set()
    if not isinstance(target, str) or (target not in named and target not in {_canonical(name) for name in named}):
        described = ", ".join(builtin)
        raise UserError(
            f"{where}={target} is not a class this project builds from settings ({described}, or a {group} a "
            f"config of this run names: conf/{group}/, your config directory)"
        )
    try:
        cls = class_at(target)
    except Exception as err:  # a module that is gone, or fails as it is imported
        raise UserError(f"{where}={target} cannot be imported: {first_line(err)}") from None
    if not (inspect.isclass(cls) and issubclass(cls, base)):
        raise UserError(f"{where}={target} is not {kind} class")
    return cls


def class_at(target: str) -> Any:
    """hydra.utils.get_class, without the ERROR record it logs before it raises (the console would print it as a
    second, longer error line): the caller says what failed, once."""
    hydra_log = logging.getLogger("hydra.utils")
    level = hydra_log.level
    hydra_log.setLevel(logging.CRITICAL)
    try:
        return get_class(target)
    finally:
        hydra_log.setLevel(level)


def instantiated(node: Any, where: str, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, where an object that cannot be imported or refuses its settings (a value Lightning's
    Trainer does not take, a logger whose package is not installed, a class name mistyped) is one UserError naming
    `where`, in the error's own words; Hydra would print its own lines and the run directory would be left behind."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, UserError):
            raise cause from None
        if not isinstance(
            cause, ImportError | ValueError | TypeError | MisconfigurationException | InstantiationException
        ):
            raise  # an error inside a class of one's own: its traceback is what finds it
        raise UserError(f"{where}: {first_line(cause)}") from None


def dotted(cls: type) -> str:
    """A class's name where it is defined: what a checkpoint records of it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _canonical(target: str) -> str | None:
    """Where the class that trusted input names is defined (it may name it where it is re-exported)."""
    try:
        return dotted(class_at(target))
    except Exception:  # a name that does not import is no class to compare with
        return None


def data_class(checkpoint: Mapping[str, Any], where: str = DATA_TARGET) -> type:
    """The DataModule class a checkpoint's data settings are for, once trusted input names it too (trusted_class);
    its settings checked against its signature."""
    target = checkpoint.get(DATA_TARGET, DEFAULT_TARGET["data"])
    cls = trusted_class("data", target, where)
    settings = checkpoint.get("datamodule_hyper_parameters")
    refuse_instructions(settings, "datamodule_hyper_parameters", top=False)
    check_arguments(cls, settings, "datamodule_hyper_parameters", f"the DataModule ({target})", 0)
    return cls


def _configured(group: str) -> set[str]:
    """The `_target_` of every option of `group` on the running Hydra app's search path (none outside one), each
    option composed alone as Hydra composes it: its defaults list, a schema, included."""
    if not GlobalHydra.instance().is_initialized():
        return set()
    loader, targets = GlobalHydra.instance().config_loader(), set()
    # A config directory added on the command line with hydra.searchpath=[...] (--config-dir is in the loader's own).
    searched = [o for o in _hydra_overrides() if sweep.split_override(o)[0] == "hydra.searchpath"]
    for option in loader.get_group_options(group, overrides=searched):
        try:
            composed = loader.load_configuration(
                config_name=None, overrides=[*searched, f"+{group}={option}"], run_mode=RunMode.RUN
            )
            targets.add(str(composed[group]._target_))
        except Exception:  # an option that does not compose alone names nothing here
            continue
    return targets


def _hydra_overrides() -> list[str]:
    """The hydra.* overrides of the running app's command line ([] outside one)."""
    try:
        return list(HydraConfig.get().overrides.hydra)
    except ValueError:  # no HydraConfig: not inside a Hydra app
        return []


def check_datamodule(datamodule: Any, named: str, interface: dict[str, str] = DATA_INTERFACE) -> None:
    """Refuse a DataModule that does not offer `interface`, or whose saved settings could not rebuild it from a
    checkpoint, naming what is missing. `named`: where the class was named, e.g. "data._target_=mydata.Stripes"."""
    # Lightning's DataModule has every hook, raising until a subclass gives it: a hook it did not override is missing.
    missing = [
        f"{name} ({what})"
        for name, what in interface.items()
        if not hasattr(datamodule, name)
        or getattr(type(datamodule), name, None) is getattr(L.LightningDataModule, name, 0)
    ]
    if missing:
        raise UserError(f"{named} does not offer {'; '.join(missing)} (docs/extend.md#your-data)")
    if interface is not DATA_INTERFACE:
        return
    shape, classes = datamodule.input_shape, datamodule.classes
    if not (isinstance(shape, tuple | list) and len(shape) == 3 and all(is_whole(n) and n > 0 for n in shape)):
        raise UserError(f"{named}: input_shape={shape!r} must be three whole numbers C, H, W")
    if not (isinstance(classes, list | tuple) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
        raise UserError(f"{named}: classes must be a list of two or more class names")
    saved = dict(datamodule.hparams)
    needed = [
        p.name
        for p in inspect.signature(type(datamodule)).parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in saved
    ]
    if needed:
        raise UserError(
            f"{named} does not save its settings ({', '.join(needed)}), which rebuild it from a "
            "checkpoint: call self.save_hyperparameters() in its __init__"
        )
    check_arguments(type(datamodule), saved, "data", named, 0)


def with_data_shape(settings: dict[str, Any], datamodule: Any) -> dict[str, Any]:
    """The model's settings with each FROM_DATA key that they set to null taken from the data."""
    channels, height, width = datamodule.input_shape
    values = {"in_channels": channels, "image_size": height, "num_classes": len(datamodule.classes)}
    if settings.get("image_size", 0) is None and height != width:
        raise UserError(f"model.image_size cannot be taken from the data's {height}×{width} images: set it")
    return {key: values[key] if key in values and value is None else value for key, value in settings.items()}


def check_model(net: torch.nn.Module, target: str, where: str) -> None:
    """Refuse a built model that does not offer MODEL_INTERFACE, naming what is missing."""
    missing = [f"{name} ({what})" for name, what in MODEL_INTERFACE.items() if not hasattr(net, name)]
    if missing:
        raise UserError(
            f"{where}._target_={target} does not offer {'; '.join(missing)}: a model sets them in its __init__ "
            "(docs/extend.md#your-network)"
        )
    shape, classes = net.input_shape, net.num_classes
    if not (isinstance(shape, tuple | list) and len(shape) == 3 and all(is_whole(n) and n > 0 for n in shape)):
        raise UserError(f"{where}._target_={target}: input_shape={shape!r} must be three whole numbers C, H, W")
    if not is_whole(classes) or classes < 2:
        raise UserError(f"{where}._target_={target}: num_classes={classes!r} must be a whole number of at least 2")


def check_forward(net: torch.nn.Module, where: str, device: str = "cpu") -> None:
    """One forward pass of two blank images of the network's input_shape, on a copy of it, in eval mode, without
    gradients, on the device it will train on, its random numbers drawn from a fork of torch's generators (the
    network itself, and the run's random streams, as they were): refuse a network whose forward() fails on them, or
    gives anything but one row of num_classes scores per image, before training; else the first batch fails deep
    inside the loss, the metrics or the TensorBoard graph."""
    shape = "×".join(map(str, net.input_shape))
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            probe = copy.deepcopy(net).to(device).eval()
            scores = probe(torch.zeros(2, *net.input_shape, device=device))
    except Exception as err:
        raise UserError(f"{where}: forward() fails on images of its input_shape {shape}: {first_line(err)}") from None
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (2, net.num_classes):
        given = f"a tensor of shape {tuple(scores.shape)}" if isinstance(scores, torch.Tensor) else kind(scores)
        raise UserError(
            f"{where}: forward() must give one row of num_classes={net.num_classes} class scores per image "
            f"(2 × {net.num_classes} for 2 images), but gives {given}"
        )


def checked_class(settings: Any, group: str, where: str) -> type:
    """The class that a settings node of `group` (net, optimizer, scheduler) names, once the node has passed.

    It passes when its `_target_` is one of BUILDS[group]'s classes and every other value is plain data of the kind
    its parameter takes (no objects, no Hydra instructions). Raises UserError naming the key path (`where`...).
    """
    allowed, described, supplied = BUILDS[group]
    settings = plain(settings)
    if group == "scheduler":  # its nulls that the run fills in (SCHEDULE_FROM_RUN) are checked as filled
        settings = _from_run(settings, None, 2)
    if not isinstance(settings, Mapping):
        raise UserError(f"{where} must be a mapping of settings, not {kind(settings)}")
    refuse_instructions(settings, where, top=True)
    target = settings.get("_target_")
    if group == "net":
        cls = trusted_class("model", target, f"{where}._target_")
    elif not isinstance(target, str) or target not in allowed:
        raise UserError(f"{where}._target_={target} is not a class this project builds from settings ({described})")
    else:
        cls = allowed[target]
    values = {key: value for key, value in settings.items() if key not in HOW_TO_BUILD}
    check_arguments(cls, values, where, target, supplied)
    return cls


def build(settings: Any, group: str, *args: Any, where: str, total_steps: int = 2) -> Any:
    """Build a network, optimizer or scheduler from its settings: `checked_class(...)(*args, **values)`.

    The one way Classifier builds them, from a config file or a checkpoint alike: no `hydra.utils.instantiate`,
    which would call whatever a `_target_` names, at any depth. A schedule's settings that SCHEDULE_FROM_RUN takes
    from the run, when null: its optimizer's (args[0]) learning rates, and `total_steps`.
    """
    if group == "scheduler":
        settings = _from_run(plain(settings), args[0], total_steps)
    cls = checked_class(settings, group, where)
    values = {key: value for key, value in plain(settings).items() if key not in HOW_TO_BUILD}
    if group != "net":
        return cls(*args, **values)
    if torch.get_default_device().type != "meta":
        _check_size(cls, values, where)
    net = cls(*args, **values)
    check_model(net, plain(settings)["_target_"], where)
    return net


def _from_run(settings: Any, optimizer: Any, total_steps: int) -> Any:
    """A schedule's settings with the null ones SCHEDULE_FROM_RUN names filled from the run: a one-cycle peak is each
    parameter group's own learning rate (so norm_lr_scale carries through), its length the run's steps. Without an
    optimizer (checking settings alone) the peak is a stand-in."""
    if not isinstance(settings, Mapping) or settings.get("_target_") not in SCHEDULE_FROM_RUN:
        return settings
    peak, length = SCHEDULE_FROM_RUN[settings["_target_"]]
    filled = dict(settings)
    if filled.get(peak, 0) is None:
        optimized = isinstance(optimizer, torch.optim.Optimizer)
        filled[peak] = [group["lr"] for group in optimizer.param_groups] if optimized else 1.0
    if filled.get(length, 0) is None:
        filled[length] = total_steps
    return filled


def default_of(settings: Any, group: str, name: str) -> Any:
    """The default of the class's parameter `name` that a settings node of `group` leaves out (optimizer.lr)."""
    parameter = inspect.signature(checked_class(settings, group, group)).parameters.get(name)
    return None if parameter is None or parameter.default is parameter.empty else parameter.default


def steps_per_batch(settings: Any) -> bool:
    """Whether a schedule steps after every batch (one-cycle), not every epoch."""
    return isinstance(settings, Mapping) and settings.get("_target_") in SCHEDULE_FROM_RUN


def _check_size(cls: type, values: dict[str, Any], where: str) -> None:
    """Refuse a network that could not be trained in this machine's memory, measured on torch's meta device first
    (which allocates nothing) instead of failing in the allocator with a traceback."""
    try:
        with torch.device("meta"):
            parameters = sum(p.numel() for p in cls(**values).parameters())
    except UserError:
        raise
    except Exception:  # a model of one's own that cannot be made without memory: built for real, unmeasured
        return
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    needed = 16 * parameters  # float32 weights, gradients and two optimizer moments
    if needed > memory:
        raise UserError(
            f"{'model' if where == 'model' else where}: the network would have {parameters:,} parameters, "
            f"{needed / 2**30:,.0f} GiB to train (weights, gradients, optimizer state), more than this machine's "
            f"{memory / 2**30:.0f} GiB: use fewer model.channels or model.hidden, or a smaller image_size"
        )


def check_classifier_settings(settings: Mapping[str, Any], where: str = "classifier") -> None:
    """The Classifier's own plain settings (CLASSIFIER_SETTINGS), from a config or a checkpoint."""
    smoothing = settings.get("label_smoothing", 0.0)
    if not is_number(smoothing) or not 0 <= smoothing < 1:
        raise UserError(f"{where}.label_smoothing={smoothing!r} must be a number at least 0 and below 1")
    if not isinstance(settings.get("flip_average", False), bool):
        raise UserError(f"{where}.flip_average={settings['flip_average']!r} must be true or false")
    shift = settings.get("shift_average", 0)
    if not is_whole(shift) or not 0 <= shift <= MAX_SHIFT:
        raise UserError(f"{where}.shift_average={shift!r} must be 0 (off) or a number of pixels up to {MAX_SHIFT}")
    scale = settings.get("norm_lr_scale", 1.0)
    if not is_number(scale) or not 0 < scale < float("inf"):
        raise UserError(f"{where}.norm_lr_scale={scale!r} must be a number above 0 (1: the optimizer's lr)")
    decay = settings.get("norm_weight_decay")
    if decay is not None and (not is_number(decay) or not 0 <= decay < float("inf")):
        raise UserError(f"{where}.norm_weight_decay={decay!r} must be a number at least 0, or null (the optimizer's)")


def check_model_settings(settings: Any, where: str) -> None:
    if not isinstance(settings, Mapping):
        raise UserError(f"{where} must be a mapping of the model's settings, not {kind(settings)}")
    for key, value in settings.items():
        if key in CLASSIFIER_SETTINGS:
            continue
        if key not in MODEL_GROUPS:
            known = ", ".join([*MODEL_GROUPS, *CLASSIFIER_SETTINGS])
            raise UserError(f"{where}.{key} is not a setting of the model (it takes {known})")
        if key != "scheduler" or value:  # no scheduler: null or an empty mapping
            checked_class(value, key, f"{where}.{key}")
    check_classifier_settings(settings, where)


def refuse_instructions(value: Any, where: str, top: bool) -> None:
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
            refuse_instructions(item, f"{where}.{key}", top=False)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            refuse_instructions(item, f"{where}[{index}]", top=False)


def check_arguments(cls: type, values: Any, where: str, name: str, supplied: int) -> None:
    """Every value is a keyword argument of `cls` (past the `supplied` leading ones) and of the kind it takes."""
    if not isinstance(values, Mapping):
        raise UserError(f"{where} must be a mapping of settings, not {kind(values)}")
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
        return is_plain(value)
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


def is_plain(value: Any) -> bool:
    """None, a bool, number or string, or a list of them."""
    if isinstance(value, list | tuple):
        return all(is_plain(item) for item in value)
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


# Scheduler settings that are learning rates or their factors (a negative one trains away from the minimum), and
# lengths in steps or epochs (a negative one makes a schedule repeat: cosine's T_max from trainer.max_epochs=-1).
RATES = ("max_lr", "base_lr", "eta_min", "min_lr", "gamma", "div_factor", "final_div_factor", "factor", "end_factor")
LENGTHS = ("T_max", "T_0", "step_size", "step_size_up", "total_steps", "total_iters")


def check_optimizer_and_scheduler(
    optimizer: dict[str, Any], scheduler: dict[str, Any] | None, norm_lr_scale: float = 1.0
) -> None:
    """Build the optimizer and schedule on stand-in parameters, take one optimizer step and two of the schedule: torch
    checks its optimizers' ranges (a negative weight_decay) only when it builds one, a rate beyond float32's range
    overflows only as it steps, and a schedule divides by its settings (a step_size or T_max of 0) only when it steps,
    all during training, with a traceback. A schedule's rates and lengths must be 0 or more."""
    for key, value in (scheduler or {}).items():
        values = value if isinstance(value, list | tuple) else [value]
        if key in RATES and any(is_number(v) and v < 0 for v in values):
            raise UserError(f"scheduler.{key}={value}: a learning rate or its factor must be 0 or more")
        if key in LENGTHS and any(is_number(v) and v < 0 for v in values):
            raise UserError(f"scheduler.{key}={value}: a length in steps or epochs must be 1 or more")
    group, settings = "optimizer", optimizer
    parameters = [torch.nn.Parameter(torch.zeros(1, 1, 1, 1)), torch.nn.Parameter(torch.zeros(1))]  # a filter, a bias
    groups: Any = parameters  # one group, as the Classifier's parameters are (LBFGS takes no other)
    if norm_lr_scale != 1:  # classifier.norm_lr_scale: batch norm's own group at the optimizer's lr × the scale
        lr = optimizer.get("lr", default_of(optimizer, "optimizer", "lr"))
        groups = [{"params": parameters[:1]}, {"params": parameters[1:], "lr": lr * norm_lr_scale}]
    try:
        built = build(optimizer, "optimizer", groups, where="optimizer")
        _stand_in_step(built, parameters, optimizer, norm_lr_scale)
        if scheduler:
            group, settings = "scheduler", scheduler
            with warnings.catch_warnings():  # a schedule stepped before its optimizer: the order is no matter here
                warnings.simplefilter("ignore")
                schedule = build(scheduler, "scheduler", built, where="scheduler")
                for _ in range(2):
                    schedule.step()
    except (ValueError, TypeError, ZeroDivisionError, IndexError) as err:
        zeros = [key for key, value in settings.items() if value == 0 and not isinstance(value, bool)]
        if isinstance(err, ZeroDivisionError) and zeros:
            raise UserError(f"{group}.{zeros[0]}=0: the schedule divides by it as it steps, give 1 or more") from None
        raise UserError(f"{group} ({short(settings)}) is refused by torch: {first_line(err)}") from None


def _stand_in_step(
    optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter], settings: Any, norm_lr_scale: float
) -> None:
    """One step on the stand-in parameters: a rate or decay beyond what a float32 weight takes overflows only there.
    Anything else the step may refuse here (capturable=true takes GPU tensors) is the real run's to judge."""
    for parameter in parameters:
        parameter.grad = torch.ones_like(parameter)
    try:
        optimizer.step(lambda: torch.zeros(()))
    except RuntimeError as err:
        if "overflow" in str(err):
            scaled = f" × classifier.norm_lr_scale={norm_lr_scale}" if norm_lr_scale != 1 else ""
            raise UserError(f"optimizer ({short(settings)}{scaled}): a rate or decay beyond float32's range") from None
    except (AssertionError, ValueError, TypeError):
        pass


def what_to_build(settings: Any) -> Any:
    """Settings as what they build: the class and its values, with the defaults of its signature for what they leave
    out (so `nesterov: false` and no nesterov are the same SGD), without Hydra's other keys (`_partial_`, which
    configs held until it was dropped as unused, among them), so that stored and given settings compare by meaning."""
    if not isinstance(settings, Mapping):
        return settings
    given = {key: value for key, value in settings.items() if key == "_target_" or key not in HOW_TO_BUILD}
    cls = next(
        (classes[given["_target_"]] for classes, _, _ in BUILDS.values() if given.get("_target_") in classes), None
    )
    if cls is None:
        return given
    supplied = next(count for classes, _, count in BUILDS.values() if cls in classes.values())
    parameters = list(inspect.signature(cls).parameters.values())[supplied:]
    defaults = {p.name: p.default for p in parameters if p.default is not p.empty}
    return defaults | given


def kind(value: Any) -> str:
    return f"a {type(value).__name__}"


def short(settings: Mapping[str, Any] | None) -> str:
    """A config group's settings in one line: its class's name and its values."""
    if not settings:
        return "none"
    values = ", ".join(f"{key}={value}" for key, value in settings.items() if not key.startswith("_"))
    return f"{str(settings.get('_target_', '')).rsplit('.', 1)[-1]} {values}".strip()
