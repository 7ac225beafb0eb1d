"""The private names of Lightning (and of torch's TensorBoard writer and Hydra) that cnn_exp relies on, where no
public API does the job (the comment beside each use says why), are still there and take what cnn_exp passes.

A release that removes or renames one fails here, naming it, instead of a run that quietly does something else: a
ModelCheckpoint that deletes outside its folder, a last.ckpt no longer written every epoch, a progress bar counting
from 0. requirements.txt bounds Lightning to the releases this has passed on.
"""

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

# Each private function cnn_exp calls or overrides → all its parameters, in order: an override must take whatever
# Lightning passes, so a new parameter, even an optional one, is a change to look at.
CALLED = {
    # cnn_exp/callbacks.py ModelCheckpoint: deletes only its own files; writes last.ckpt at every epoch's end.
    "lightning.pytorch.callbacks.ModelCheckpoint._remove_checkpoint": ["self", "trainer", "filepath"],
    "lightning.pytorch.callbacks.ModelCheckpoint._save_last_checkpoint": ["self", "trainer", "monitor_candidates"],
    "lightning.pytorch.callbacks.ModelCheckpoint._should_skip_saving_checkpoint": ["self", "trainer"],
    "lightning.pytorch.callbacks.ModelCheckpoint._monitor_candidates": ["self", "trainer"],
    "lightning.pytorch.callbacks.ModelCheckpoint._should_save_on_train_epoch_end": ["self", "trainer"],
    # cnn_exp/callbacks.py EarlyStopping: the epoch of the best score.
    "lightning.pytorch.callbacks.EarlyStopping._run_early_stopping_check": ["self", "trainer"],
    # cnn_exp/callbacks.py ProgressBar: epochs counted from 1; the bar ended on the run's final numbers.
    "lightning.pytorch.callbacks.RichProgressBar._get_train_description": ["self", "current_epoch"],
    "lightning.pytorch.callbacks.RichProgressBar._stop_progress": ["self"],
    "lightning.pytorch.callbacks.progress.rich_progress.MetricsTextColumn.update": ["self", "metrics"],
    # cnn_exp/tensorboard.py: the network's graph by its layers' names; the HParams tab in the run's own events.
    "torch.utils.tensorboard.SummaryWriter._get_file_writer": ["self"],
    "torch.utils.tensorboard.writer.FileWriter.add_graph": ["self", "graph_profile", "walltime"],
    "torch.utils.tensorboard.writer.FileWriter.add_summary": ["self", "summary", "global_step", "walltime"],
    "torch.utils.tensorboard._pytorch_graph.graph": ["model", "args", "verbose", "use_strict_trace"],
    # cnn_exp/sweep.py: the jobs a stopped sweep never started.
    "hydra._internal.core_plugins.basic_sweeper.BasicSweeper.split_arguments": ["overrides", "max_batch_size"],
}

# Each private attribute cnn_exp reads on Lightning's objects → how to make one, and whether it is then true.
SET: dict[str, tuple[Callable[[Path], Any], bool]] = {
    # cnn_exp/callbacks.py ProgressBar: the metrics beside the bar, updated once training ends (None until it starts).
    "lightning.pytorch.callbacks.RichProgressBar._metric_component": (lambda _: RichProgressBar(), False),
    # cnn_exp/tensorboard.py TensorBoardLogger: whether log_graph= asked for the graph.
    "lightning.pytorch.loggers.TensorBoardLogger._log_graph": (lambda d: TensorBoardLogger(d, log_graph=True), True),
}

# Each private module named in cnn_exp without being imported from.
NAMED = [
    "hydra._internal.core_plugins.basic_launcher",  # cnn_exp/console.py: its log lines kept off the console, by name
]


def resolve(name: str) -> Any:
    """What a dotted name names: the longest importable module, then its attributes."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:end]))
        except ImportError:
            continue
        for part in parts[end:]:
            assert hasattr(found, part), f"{name} is gone: {part} is not in {found!r}"
            found = getattr(found, part)
        return found
    raise AssertionError(f"{name} is gone: no module of it imports")


@pytest.mark.parametrize("name", CALLED)
def test_a_private_function_cnn_exp_relies_on_still_takes_what_it_passes(name: str) -> None:
    parameters = list(inspect.signature(resolve(name)).parameters)
    assert parameters == CALLED[name], f"{name} now takes ({', '.join(parameters)})"


@pytest.mark.parametrize("name", SET)
def test_a_private_attribute_cnn_exp_relies_on_is_still_set(name: str, tmp_path: Path) -> None:
    make, true = SET[name]
    owner, attribute = name.rsplit(".", 1)
    made = make(tmp_path)
    assert isinstance(made, resolve(owner)) and hasattr(made, attribute), f"{name} is gone"
    assert bool(getattr(made, attribute)) is true, f"{name} now starts as {getattr(made, attribute)!r}"


@pytest.mark.parametrize("name", NAMED)
def test_a_private_module_cnn_exp_names_still_exists(name: str) -> None:
    assert inspect.ismodule(resolve(name)), f"{name} is no longer a module"
