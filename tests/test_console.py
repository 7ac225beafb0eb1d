"""What a run prints: the progress bar's final numbers, a short console for a run and a sweep, --help, early
stopping that says why."""

import csv
import logging
import math
import re
from collections.abc import Iterator
from io import StringIO
from pathlib import Path

import lightning as L
import pytest
import rich
import torch
from torch.utils.data import DataLoader, TensorDataset

from cnn_exp import console
from cnn_exp.callbacks import EarlyStopping, ProgressBar
from cnn_exp.classifier import Classifier
from cnn_exp.reports import UntrainedScores
from tests.conftest import QUICK, ROOT, read_metrics, run
from tests.test_classifier import SGD, net

EPOCH_METRICS = ["train/loss", "train/acc", "val/loss", "val/acc"]
WIDTH = 100  # the terminal the targets are for


@pytest.fixture
def screen() -> Iterator[StringIO]:
    """What the run's console prints, as a file would receive it; the console is set back afterwards."""
    out = StringIO()
    yield out
    rich.reconfigure()


def fit(tmp_path: Path, *callbacks: L.Callback, max_epochs: int, log_every_n_steps: int = 50) -> L.Trainer:
    """A few epochs of Network2 on 64 random images (4 batches), validated on them too."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))
    loader = DataLoader(data, batch_size=16)
    trainer = L.Trainer(max_epochs=max_epochs, callbacks=list(callbacks), logger=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        log_every_n_steps=log_every_n_steps)  # fmt: skip
    trainer.fit(Classifier(net=net("net2"), optimizer=SGD), loader, loader)
    return trainer


def bar_line(text: str) -> tuple[str, dict[str, str]]:
    """The progress bar's final state (a console that is not a terminal gets only that): its epoch, and its numbers
    (`train: loss 2.290 acc 0.179`, then an indented `val: ...` line) under metrics.json's names."""
    (bar,) = re.findall(r"^Epoch .*\n(?: +\S.*\n)*", text, re.MULTILINE)
    shown = {f"{split}/{name}": value for split, pairs in re.findall(r"(\w+): ([^:]*?)\s*(?=\n|$)", bar, re.M)
             for name, value in re.findall(r"(\w+) ([-\d.]+)", pairs)}  # fmt: skip
    return bar.split("━")[0].strip(), shown


@pytest.mark.parametrize(("max_epochs", "log_every_n_steps"), [(1, 50), (2, 1)])
def test_the_bar_ends_on_the_last_epochs_numbers_counted_from_one(
    tmp_path: Path, screen: StringIO, max_epochs: int, log_every_n_steps: int
) -> None:
    """Before: Epoch 1/1 after 2 epochs, and the previous epoch's train numbers (none at all after 1 epoch).
    A step's loss (train/loss_step, logged every log_every_n_steps) is shown while training, not at the end."""
    bar = ProgressBar(console_kwargs={"file": screen, "width": 300})
    trainer = fit(tmp_path, bar, max_epochs=max_epochs, log_every_n_steps=log_every_n_steps)
    assert ("train/loss_step" in trainer.progress_bar_metrics) is (log_every_n_steps == 1)
    epoch, shown = bar_line(screen.getvalue())
    assert epoch == f"Epoch {max_epochs}/{max_epochs}"
    # callback_metrics is what run.py writes to metrics.json.
    assert shown == {name: f"{float(trainer.callback_metrics[name]):.3f}" for name in EPOCH_METRICS}


def test_log_lines_print_on_the_bars_console_above_it(tmp_path: Path, screen: StringIO) -> None:
    """A line logged while the bar is live goes through the bar's own console, not around it."""
    logger, handler = logging.getLogger("cnn_exp.reports"), console.Handler()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        fit(tmp_path, UntrainedScores(), ProgressBar(console_kwargs={"file": screen, "width": 300}), max_epochs=1)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        logging.captureWarnings(False)  # which the handler turned on
    lines = screen.getvalue().splitlines()
    untrained = next(i for i, line in enumerate(lines) if line.startswith("untrained network, 16 images"))
    assert untrained < next(i for i, line in enumerate(lines) if line.startswith("Epoch 1/1"))


def test_early_stopping_says_when_and_why(tmp_path: Path) -> None:
    # Improving by 1.0 in accuracy is impossible: the first validation sets the best, the second ends the run.
    stopping = EarlyStopping(monitor="val/acc", mode="max", patience=1, min_delta=1.0)
    trainer = fit(tmp_path, stopping, max_epochs=5)
    assert trainer.current_epoch == 2
    stopped = stopping.stopped
    assert stopped is not None and stopped.pop("best") == pytest.approx(stopping.best_score.item())
    assert stopped == {
        "epoch": 2,
        "monitor": "val/acc",
        "mode": "max",
        "patience": 1,
        "min_delta": 1.0,
        "best_epoch": 1,
        "reason": f"val/acc has not improved on its best ({stopping.best_score.item():.4f} at epoch 1) for 1 "
        "validation (patience 1)",
    }
    assert EarlyStopping(monitor="val/acc").stopped is None


@pytest.mark.parametrize(
    ("name", "message", "shown"),
    [
        ("lightning.fabric.utilities.seed", "Seed set to 0", False),
        ("lightning.fabric.utilities.seed", "[rank: 1] Seed set to 0", False),
        ("lightning.pytorch.utilities.rank_zero", "GPU available: False, used: False", False),
        ("lightning.pytorch.utilities.rank_zero", "GPU available: True (cuda), used: True", True),
        ("lightning.pytorch.accelerators.cuda", "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES: [0]", False),
        ("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud uploads and versioning, try", False),
        ("lightning.pytorch.utilities.rank_zero", "`Trainer.fit` stopped: `max_epochs=2` reached.", False),
        ("lightning.pytorch.utilities.rank_zero", "`Trainer.fit` stopped: `max_steps=6` reached.", True),
        ("hydra._internal.core_plugins.basic_launcher", "\t#0 : optimizer.lr=0.1", False),
        ("hydra_plugins.hydra_optuna_sweeper._impl", "Sampler: TPESampler", False),
        ("hydra_plugins.hydra_optuna_sweeper._impl", "Best parameters: {'optimizer.lr': 0.01}", True),
        ("cnn_exp.data", "copied train-images-idx3-ubyte from tests/data/MNIST/raw", True),
    ],
)
def test_the_console_keeps_what_a_user_can_act_on(name: str, message: str, shown: bool) -> None:
    record = logging.LogRecord(name, logging.INFO, __file__, 1, message, None, None)
    assert console.Quiet().filter(record) is shown


def test_a_python_warning_reads_as_one_line() -> None:
    lightning = "/site-packages/lightning/pytorch/loops/fit_loop.py:321: The number of training batches (8) is small\n"
    assert console._warning_text(lightning) == "The number of training batches (8) is small"
    python = "/a/b.py:3: FutureWarning: `x` is deprecated\n  x()\n"
    assert console._warning_text(python) == "`x` is deprecated"


def screen_lines(text: str) -> int:
    """Lines of a WIDTH-column terminal that `text` fills (a long line wraps)."""
    return sum(max(1, math.ceil(len(line.rstrip()) / WIDTH)) for line in text.splitlines())


@pytest.mark.slow
def test_a_runs_console_fits_a_screen_and_ends_on_its_results(
    paths: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Up to its first step a run prints its header, layer table and first lines in one screen (~40 lines; the
    config tree alone was ~130); its bar ends on metrics.json's numbers; early stopping says why."""
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    stopping = ["callbacks=[default,early_stopping]", "callbacks.early_stopping.patience=1"]
    stopping += ["callbacks.early_stopping.min_delta=1.0"]  # stops after epoch 2 of 3
    proc = run("train.py", *paths, *QUICK, "trainer.max_epochs=3", *stopping, f"hydra.run.dir={tmp_path}")
    result = read_metrics(tmp_path)
    assert proc.stderr == ""
    before_training = proc.stdout.partition("\nEpoch ")[0]
    assert screen_lines(before_training) <= 40, before_training
    assert f"overrides  {paths[0]}" in before_training and str(tmp_path) in before_training
    assert "ConvNet, one 1×28×28 image" in before_training and "untrained network" in before_training
    for noise in ("Seed set", "GPU available", "TPU available", "Tip:", "Trainer already configured", "fit_loop.py"):
        assert noise not in proc.stdout

    epoch, shown = bar_line(proc.stdout)
    assert epoch == "Epoch 2/3"
    assert shown == {name: f"{result['metrics'][name]:.3f}" for name in EPOCH_METRICS}
    stopped = result["early_stopping"]
    assert (stopped["epoch"], stopped["monitor"], stopped["patience"], result["epochs"]) == (2, "val/acc", 1, 2)
    assert f"early stopping after epoch 2: {stopped['reason']}" in proc.stdout
    last = proc.stdout.splitlines()[-3:]
    shown_last = ["val/acc", "val/loss", "test/acc", "test/loss"]
    took = f"finished in {result['wall_time_s']:.0f} s: 2 epochs, stopped early (val/acc, patience 1), tested "
    assert last[0] == took + Path(result["tested"]).name
    assert last[1] == " · ".join(f"{name} {result['metrics'][name]:.4f}" for name in shown_last)
    assert last[2] == f"results in {tmp_path}"


@pytest.mark.slow
def test_a_sweep_prints_a_start_and_a_result_line_per_job(paths: list[str]) -> None:
    """Before: 855 lines for 4 jobs. Each job's own output (bar, tables, log lines) goes to its train.log."""
    proc = run("train.py", "-m", *paths, *QUICK, "test=false", "optimizer.lr=0.01,1000000.0", check=False)
    sweep = Path(proc.stdout.splitlines()[0].removeprefix("sweep: "))
    assert proc.stdout.startswith("sweep: ") and sweep.is_dir()
    ok = read_metrics(sweep / "0")["metrics"]
    jobs = proc.stdout.splitlines()[1:6]
    epoch = next(row for row in csv.DictReader(open(sweep / "0" / "epochs.csv")))  # noqa: SIM115
    assert jobs == [
        "job 0: optimizer.lr=0.01",
        f"job 0: epoch 1/1 · train loss {float(epoch['train/loss']):.4f} acc {100 * float(epoch['train/acc']):.2f} % · "
        f"val loss {float(epoch['val/loss']):.4f} acc {100 * float(epoch['val/acc']):.2f} % · "
        f"{float(epoch['seconds']):.1f} s",  # its progress, a line per epoch
        f"job 0: finished in {read_metrics(sweep / '0')['wall_time_s']:.0f} s: 1 epoch · val/acc {ok['val/acc']:.4f}",
        "job 1: optimizer.lr=1000000.0",
        "job 1: failed: " + read_metrics(sweep / "1")["error"].splitlines()[-1] + " (see 1/train.log)",
    ]
    rest = "\n".join(proc.stdout.splitlines()[6:])
    assert rest.lstrip().startswith(f"sweep {sweep}: 2 jobs")  # then only the sweep's table
    assert not re.search(r"^job \d+: ", rest, re.MULTILINE) and "it/s" not in rest and "ConvNet" not in rest
    assert "untrained network" in (sweep / "0" / "train.log").read_text()


@pytest.mark.slow  # the entry scripts import torch and Lightning before Hydra reads --help
@pytest.mark.parametrize("script", ["train.py", "test.py"])
def test_help_fits_a_screen_and_names_the_choices(script: str) -> None:
    # train.py as a user's first command: a plain start, imports and all.
    text = run(script, "--help", cold=script == "train.py").stdout
    assert len(text.splitlines()) <= 45 and max(map(len, text.splitlines())) <= WIDTH
    assert text.startswith(f"{script}: ") and "Examples:" in text and "--hydra-help" in text
    if script == "test.py":
        assert "ckpt_path=FILE.ckpt" in text and "batch_size=" in text
        assert "predict=PATH" in text and "export=onnx" in text
        return
    # Every option of every group a user picks from, so that a new one cannot be missing from the help.
    for group in ("data", "model", "optimizer", "scheduler", "trainer", "logger", "experiment", "hparams_search"):
        options = sorted(path.stem for path in (ROOT / "conf" / group).glob("*.yaml"))
        listed = re.findall(rf"{group}=([\w|]+)", text)
        assert sorted({option for line in listed for option in line.split("|")}) == options, group
    assert "callbacks=default|none" in text and "callbacks=[default,early_stopping]" in text
