"""The schema of each config group this project builds itself (model, data, classifier): one dataclass per class,
made from the typed `__init__` of the class, registered in Hydra's ConfigStore as the base that conf/'s options
extend. The constructor's signature is the one declaration of a setting, its type and its default; Hydra checks
the types at compose time and names the key, the constructor checks the ranges.

Optimizers, schedules, the Trainer, callbacks and loggers keep the signatures of torch and Lightning: their configs
are checked when they are built (cnn_exp/build.py, Hydra's instantiate).
"""

import dataclasses
import inspect
import types
import typing
from collections.abc import Sequence
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from cnn_exp.build import FROM_DATA
from cnn_exp.classifier import Classifier
from cnn_exp.data import MNISTDataModule
from cnn_exp.folder import FolderDataModule
from cnn_exp.net import ConvNet

# Per schema: where it is stored (group/name), the class, the name a config's _target_ gives it (None: no
# _target_, the Classifier's own settings), and how many leading parameters the class is given otherwise.
SCHEMAS: list[tuple[str, type, str | None, int]] = [
    ("schema/model/convnet", ConvNet, "cnn_exp.net.ConvNet", 0),
    ("schema/data/mnist", MNISTDataModule, "cnn_exp.data.MNISTDataModule", 0),
    ("schema/data/folder", FolderDataModule, "cnn_exp.folder.FolderDataModule", 0),
    ("schema/classifier", Classifier, None, 3),  # net, optimizer and scheduler are groups of their own
]


def schema(cls: type, target: str | None, skip: int = 0) -> type:
    """A dataclass of `cls`'s keyword parameters (after the first `skip`): each with its default, typed where
    OmegaConf can check the type (`_checkable`), and a `_target_` naming the class."""
    hints = typing.get_type_hints(cls.__init__)
    fields: list[tuple[str, Any, Any]] = [("_target_", str, dataclasses.field(default=target))] if target else []
    for parameter in list(inspect.signature(cls).parameters.values())[skip:]:
        if parameter.kind not in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
            continue
        default = parameter.default
        hint = _checkable(hints.get(parameter.name, Any))
        if cls is ConvNet and parameter.name in FROM_DATA:  # null: taken from the data (build.with_data_shape)
            default, hint = None, hint | None
        if default is parameter.empty:
            field = dataclasses.field(default=MISSING)
        elif isinstance(default, list | tuple):
            field = dataclasses.field(default_factory=lambda default=default: list(default))
        else:
            field = dataclasses.field(default=default)
        fields.append((parameter.name, hint, field))
    return dataclasses.make_dataclass(f"{cls.__name__}Config", fields)


def _checkable(hint: Any) -> Any:
    """The type hint as OmegaConf can check it strictly: int, float and str, optional or in a list. Anything else is
    Any, left to the constructor's checks: a union such as `int | list[int]`, which OmegaConf 2.3 refuses, and bool,
    which OmegaConf would take from "yes", 1 or 2."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in (int, float, str):
        return hint
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        (inner,) = [arg for arg in args if arg is not type(None)]
        checked = _checkable(inner)
        return Any if checked is Any else checked | None
    if origin in (list, Sequence) and len(args) == 1 and args[0] in (int, float, str):
        return list[args[0]]
    return Any


def store() -> None:
    """Register the schemas in Hydra's ConfigStore (the entry points call it before Hydra composes the config)."""
    for path, cls, target, skip in SCHEMAS:
        group, _, name = path.rpartition("/")
        ConfigStore.instance().store(group=group, name=name, node=schema(cls, target, skip))
