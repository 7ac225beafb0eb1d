"""TensorBoard as a user reads it: each run named for what it is, the epoch curves first, the network's own layers,
and an HParams tab with the keys a sweep varies and the run's real results."""

import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from lightning.pytorch.loggers import tensorboard
from lightning.pytorch.utilities import rank_zero_only
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from torch.utils.tensorboard._pytorch_graph import graph  # private: add_graph's tracer; add_graph cannot rename

from cnn_exp import record
from cnn_exp.sweep import running_sweep_keys, split_override

# TensorBoard orders its charts by the text before the first "/", alphabetically: as acc/… and loss/… the epoch
# curves come first, train beside val. Every other name is the one the run logs (test/acc, train/loss_step, …).
TAGS = {
    record.TRAIN_ACC: "acc/train",
    record.VAL_ACC: "acc/val",
    record.TRAIN_LOSS: "loss/train",
    record.VAL_LOSS: "loss/val",
}


class TensorBoardLogger(tensorboard.TensorBoardLogger):
    """Lightning's TensorBoard logger, writing to `<save_dir>/<name>/<run name>`: TensorBoard names a run by that
    path, so it ends in what the run is (see `run_name`). A run continued with resume= keeps its TensorBoard run.

    Lightning's `epoch` chart is left out (the curves are against steps; epochs.csv has epochs), and the graph is
    the network's (conv1 … out) rather than that of the LightningModule wrapping it.
    """

    def __init__(self, save_dir: str, name: str = "tensorboard", version: str | None = None, **kwargs: Any) -> None:
        if version is None:
            version = _continued(Path(save_dir) / name)
            version = run_name() if version is None else version
        super().__init__(save_dir, name=name, version=version, **kwargs)
        self._graph_logged = False

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics({TAGS.get(key, key): value for key, value in metrics.items() if key != "epoch"}, step)

    @rank_zero_only
    def log_graph(self, model: L.LightningModule, input_array: torch.Tensor | None = None) -> None:
        net = getattr(model, "net", model)
        example = model.example_input_array if input_array is None else input_array
        # Lightning asks again for the final test: one graph a run. Its log_graph= is kept only as a private attribute.
        if not self._log_graph or example is None or self._graph_logged:
            return
        self._graph_logged = True
        # torch names each node <class>/<type>[<layer>]/…: dropping the network's class and the types leaves the
        # layers, conv1 … out, as the graph's top-level boxes. SummaryWriter.add_graph does the same minus the renaming.
        graph_def, step_stats = graph(net, example.to(model.device))
        prefix = f"{type(net).__name__}/"
        for node in graph_def.node:
            node.name = _layer_path(node.name, prefix)
            node.input[:] = [_layer_path(name, prefix) for name in node.input]
        # SummaryWriter's only public way to a graph (add_graph) traces the network again, unrenamed: its file writer.
        self.experiment._get_file_writer().add_graph((graph_def, step_stats))


def _layer_path(name: str, prefix: str) -> str:
    return re.sub(r"\w+\[([^\]]+)\]", r"\1", name.removeprefix(prefix))


def _continued(root: Path) -> str | None:
    """The TensorBoard run already in this run directory (one resumed), if there is one: "" for events written
    straight into `root`, else the name of its single run folder."""
    if not root.is_dir():
        return None
    if any(root.glob("events.out.tfevents.*")):
        return ""
    runs = [path.name for path in root.iterdir() if path.is_dir()]
    return runs[0] if len(runs) == 1 else None


def run_name() -> str:
    """What a run is: for a sweep's job the values it varies (`lr=0.1,padding=2`), else its model, data and start
    time (`net2-mnist-2026-11-28_04-17-03`)."""
    started = time.strftime("%Y-%m-%d_%H-%M-%S")
    if not HydraConfig.initialized():
        return started
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        choices = hydra.runtime.choices
        return "-".join(filter(None, [choices.get("model"), choices.get("data"), started]))
    values = job_values(list(hydra.overrides.task), running_sweep_keys())
    name = ",".join(f"{key}={value}" for key, value in short_keys(values).items())
    # A folder name: no path separators, and short enough for any filesystem.
    return name.replace("/", "∕").replace("\\", "∖")[:200] or f"job{hydra.job.num}"


def job_values(overrides: list[str], keys: list[str] | None) -> dict[str, str]:
    """The job's value of each key in `keys` (None: of every override but paths.* and hydra.*), as given."""
    values = {}
    for override in overrides:
        key, value = split_override(override)
        if (key in keys) if keys is not None else not key.startswith(("paths.", "hydra.")):
            values[key] = value
    return {key: values[key] for key in (keys or values) if key in values}


def short_keys(values: dict[str, Any]) -> dict[str, Any]:
    """`optimizer.lr` as `lr`, unless two keys would then read alike."""
    last = [key.rsplit(".", 1)[-1] for key in values]
    return {(short if last.count(short) == 1 else key): v for short, (key, v) in zip(last, values.items(), strict=True)}


# Keys whose values are real numbers even when written as whole ones (lr=1): one type for every run.
REAL = ("lr", "momentum", "weight_decay", "dropout", "mean", "std", "eta_min")
# The metrics the HParams tab shows beside the settings: the run's own curves' last values (TensorBoard's tags).
HPARAM_METRICS = [
    TAGS[record.VAL_ACC],
    TAGS[record.VAL_LOSS],
    record.TEST_ACC,
    record.TEST_LOSS,
    TAGS[record.TRAIN_ACC],
    TAGS[record.TRAIN_LOSS],
]


@rank_zero_only
def log_hparams(trainer: L.Trainer, settings: dict[str, Any]) -> None:
    """TensorBoard's HParams tab: the run's settings (metrics.json's, and every command-line value), and as its
    metrics the last values of its own curves and test results, so they are the run's real numbers.

    Written as training starts, so a running job shows too. The keys a sweep varies (for a single run: those set on
    the command line) are marked as differing: TensorBoard shows those first, and only 5 keys until asked for more.
    Whole numbers are written as text (TensorBoard shows any number as 2.0000), real ones as numbers.
    """
    loggers = [logger for logger in trainer.loggers if isinstance(logger, tensorboard.TensorBoardLogger)]
    if not loggers:
        return
    values = setting_values(settings)
    swept = set(running_sweep_keys() or given_values(settings))
    hparams = {key: _hparam(key, value) for key, value in values.items() if value is not None}
    infos = [
        api_pb2.HParamInfo(name=key, type=_HPARAM_TYPES[type(value)], differs=key in swept)
        for key, value in sorted(hparams.items(), key=lambda item: (item[0] not in swept, item[0]))
    ]
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in HPARAM_METRICS]
    # The HParams table names each row by its group: the run name first, so its start is what a narrow column shows.
    # A sweep's job adds its sweep and number, as rows of the same name are merged into one.
    logger, run_dir = loggers[0], Path(loggers[0].save_dir)
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    group = f"{logger.version} ({run_dir.parent.name}/{run_dir.name})" if multirun else str(logger.version)
    start = plugin_data_pb2.SessionStartInfo(group_name=group, start_time_secs=time.time())
    for key, value in hparams.items():
        field = {bool: "bool_value", str: "string_value", float: "number_value"}[type(value)]
        setattr(start.hparams[key], field, value)
    # SummaryWriter.add_hparams would write them to a run of their own, and its metrics as one-point charts; it has no
    # public way to add a Summary as built here: its file writer does.
    writer = logger.experiment._get_file_writer()
    writer.add_summary(
        _hparams_summary(
            metadata.EXPERIMENT_TAG, experiment=api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics)
        )
    )
    writer.add_summary(_hparams_summary(metadata.SESSION_START_INFO_TAG, session_start_info=start))


def setting_values(settings: dict[str, Any]) -> dict[str, Any]:
    """A run's settings (its record's: the groups chosen, the key settings, the command line) under the names a user
    gives them: `model` (net3), `optimizer.lr`, and every value set on the command line, typed as Hydra reads it.
    metrics.json's names of the key settings become their config keys, so a key also set on the command line shows
    once. TensorBoard's HParams and the trackers (cnn_exp/trackers.py) show these."""
    values = {record.KEY_SETTINGS.get(key, key): value for key, value in settings.items() if key != "overrides"}
    # A group left unchosen (no experiment) is a value too: its column then says so instead of staying empty.
    values |= {group: "none" for group in record.GROUPS if group in values and values[group] is None}
    return values | {key: _typed(text) for key, text in given_values(settings).items() if key not in values}


def given_values(settings: dict[str, Any]) -> dict[str, str]:
    """The values set on the command line, as given, less where the run writes (paths.*, hydra.*), what it continues
    (resume=, ckpt_path=) and deletions (~key)."""
    given = {}
    for override in settings.get("overrides", []):
        key, value = split_override(override)
        if value not in ("", "~") and not key.startswith(("paths.", "hydra.", "resume", "ckpt_path")):
            given[key] = value
    return given


_HPARAM_TYPES = {bool: api_pb2.DATA_TYPE_BOOL, str: api_pb2.DATA_TYPE_STRING, float: api_pb2.DATA_TYPE_FLOAT64}


def _typed(text: str) -> Any:
    """A command-line value as Hydra reads it (0.05 a float, 2 an int, net3 text); anything else as given."""
    try:
        return OverridesParser.create().parse_override(f"key={text}").value()
    except Exception:  # a value Hydra took may still not parse on its own (a sweep's list): shown as given
        return text


def _hparam(key: str, value: Any) -> bool | str | float:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return float(value) if isinstance(value, float) or key.rsplit(".", 1)[-1] in REAL else str(value)
    return str(value)


def _hparams_summary(tag: str, **content: Any) -> summary_pb2.Summary:
    data = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **content)
    plugin = summary_pb2.SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=data.SerializeToString())
    metadata_pb = summary_pb2.SummaryMetadata(plugin_data=plugin)
    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, metadata=metadata_pb)])
