"""What a run shows: progress bar, layer table, TensorBoard's graph/images/scalars, and the test report's files."""

import csv
import itertools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.callbacks import RichProgressBar
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from cnn_exp import callbacks
from cnn_exp.classifier import Classifier
from cnn_exp.layers import layer_rows
from tests.conftest import read_metrics, run
from tests.test_classifier import SGD, net

# Each layer of Network2 for one image, as the lab asks students to draw it: input, output, weight, bias shapes.
NETWORK2 = [
    ("conv1", "1×28×28", "6×24×24", "6×1×5×5", "6"),
    ("conv1_relu", "6×24×24", "6×24×24", "", ""),
    ("conv1_pool", "6×24×24", "6×12×12", "", ""),
    ("conv2", "6×12×12", "12×8×8", "12×6×5×5", "12"),
    ("conv2_relu", "12×8×8", "12×8×8", "", ""),
    ("conv2_pool", "12×8×8", "12×4×4", "", ""),
    ("flatten", "12×4×4", "192", "", ""),
    ("fc1", "192", "120", "120×192", "120"),
    ("fc1_relu", "120", "120", "", ""),
    ("fc2", "120", "60", "60×120", "60"),
    ("fc2_relu", "60", "60", "", ""),
    ("out", "60", "10", "10×60", "10"),
]
# Network3 adds conv3 (k2, padding 1) before the flatten, which then yields 96 values.
NETWORK3 = [
    *NETWORK2[:6],
    ("conv3", "12×4×4", "24×5×5", "24×12×2×2", "24"),
    ("conv3_relu", "24×5×5", "24×5×5", "", ""),
    ("conv3_pool", "24×5×5", "24×2×2", "", ""),
    ("flatten", "24×2×2", "96", "", ""),
    ("fc1", "96", "120", "120×96", "120"),
    *NETWORK2[8:],
]


def rows(name: str, **overrides: object) -> list[dict]:
    return layer_rows(Classifier(net=net(name, **overrides), optimizer=SGD))


@pytest.mark.parametrize(("name", "expected"), [("net2", NETWORK2), ("net3", NETWORK3)])
def test_the_layer_table_is_the_notebooks(name: str, expected: list[tuple]) -> None:
    assert [(r["layer"], r["input"], r["output"], r["weight"], r["bias"]) for r in rows(name)] == expected


@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("name", ["net2", "net3"])
def test_the_layer_table_follows_any_padding(name: str, padding: int) -> None:
    table = rows(name, padding=padding)
    assert all(a["output"] == b["input"] for a, b in itertools.pairwise(table))
    side = 28
    for row in table:
        if row["layer"].startswith("conv") and "_" not in row["layer"]:
            kernel = int(row["weight"].split("×")[-1])
            side = side + 2 * padding - kernel + 1
            assert row["output"].endswith(f"×{side}×{side}"), row
        elif row["layer"].endswith("_pool"):
            side //= 2
            assert row["output"].endswith(f"×{side}×{side}"), row
    flatten = next(r for r in table if r["layer"] == "flatten")
    assert int(flatten["output"]) == math.prod(map(int, flatten["input"].split("×")))
    model = Classifier(net=net(name, padding=padding), optimizer=SGD)
    assert sum(r["parameters"] for r in table) == sum(p.numel() for p in model.net.parameters())


def test_a_run_shows_its_architecture_and_tensorboard_views(trained: Path) -> None:
    architecture = (trained / "architecture.md").read_text()
    assert "| conv1 | Conv2d 5×5, padding 0 | 1×28×28 | 6×24×24 | 6×1×5×5 | 6 | 156 |" in architecture
    assert "| total |" in architecture and "32,998" in architecture
    files = sorted((trained / "tensorboard").rglob("events.out.tfevents.*"))
    events = [EventAccumulator(str(f), size_guidance={"images": 0}).Reload() for f in files]
    scalars = {tag: e.Scalars(tag) for e in events for tag in e.Tags()["scalars"]}
    images = {tag: e.Images(tag) for e in events for tag in e.Tags()["images"]}
    assert any(e.Tags()["graph"] for e in events), "the model graph"
    assert {"val/confusion_matrix", "test/confusion_matrix", "test/predictions", "test/misclassified"} <= set(images)
    assert len(images["val/confusion_matrix"]) == 3, "one per validation epoch"
    assert {f"val/class_acc/{digit}" for digit in range(10)} <= set(scalars)
    assert {f"test/class_acc/{digit}" for digit in range(10)} <= set(scalars)
    assert [s.step for s in scalars["untrained/mean_max_softmax"]] == [0]
    assert 0.1 <= scalars["untrained/mean_max_softmax"][0].value < 0.2  # ten classes: about 1/10
    assert scalars["untrained/loss"][0].value == pytest.approx(math.log(10), abs=0.1)


def check_report(run_dir: Path) -> None:
    """The report files exist, decode, and agree with the run's overall test accuracy."""
    # About TensorBoard's card (some 400 pixels) per panel: the two confusion panels side by side, four images a line.
    for name, widths in (("confusion_matrix.png", (800, 960)), ("misclassified.png", (420, 420))):
        with Image.open(run_dir / name) as image:
            image.verify()
        with Image.open(run_dir / name) as image:
            assert widths[0] <= image.width <= widths[1] and 300 <= image.height <= 700
    with open(run_dir / "per_class.csv") as f:
        per_class = list(csv.DictReader(f))
    assert [row["class"] for row in per_class] == [str(digit) for digit in range(10)]
    images = sum(int(row["images"]) for row in per_class)
    correct = sum(int(row["correct"]) for row in per_class)
    weighted = sum(float(row["accuracy"]) * int(row["images"]) for row in per_class) / images
    assert images == 200
    assert correct / images == pytest.approx(read_metrics(run_dir)["metrics"]["test/acc"], abs=1e-6)
    assert weighted == pytest.approx(correct / images, abs=1e-3)


def test_train_py_writes_the_test_report(trained: Path) -> None:
    check_report(trained)


def test_test_py_prints_and_writes_the_report(trained: Path, data_dir: Path, tmp_path: Path) -> None:
    proc = run(
        "test.py",
        f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}",
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={tmp_path}",
    )
    check_report(tmp_path)
    assert "test accuracy per class" in proc.stdout and "most confused pairs" in proc.stdout
    assert "| fc1 | Linear | 192 | 120 | 120×192 | 120 | 23160 |" in (tmp_path / "architecture.md").read_text()
    # A checkpoint alone gives a report: what ran, the network, the test, inside the network.
    report = (tmp_path / "report.md").read_text()
    assert "## 1. What ran" in report and "python test.py ckpt_path=" in report and "| fc1 | Linear | 192 |" in report
    assert f"accuracy {100 * read_metrics(tmp_path)['metrics']['test/acc']:.2f} %" in report


@pytest.mark.parametrize(
    ("max_steps", "validate_every", "shown"),
    [(-1, None, [0, 4, 8, 12, 16, 19]), (6, None, [0, 4, 5]), (-1, 10, [0, 4, 8, 9, 12, 16, 19])],
)
def test_the_progress_bar_is_fed_as_often_as_it_redraws(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, max_steps: int, validate_every: int | None, shown: list[int]
) -> None:
    """One redraw a second, a batch every quarter second: every fourth batch reaches the bar, and always the last
    before the epoch ends (also cut short by max_steps) or pauses for a validation."""
    clock = itertools.count()
    monkeypatch.setattr(callbacks, "monotonic", lambda: next(clock) / 4)
    fed = []
    feed = RichProgressBar.on_train_batch_end
    monkeypatch.setattr(RichProgressBar, "on_train_batch_end", lambda self, *a: fed.append(a[-1]) or feed(self, *a))
    bar = callbacks.ProgressBar(refresh_rate=1)
    data = TensorDataset(torch.randn(20 * 8, 1, 28, 28), torch.randint(0, 10, (20 * 8,)))
    trainer = L.Trainer(max_epochs=1, max_steps=max_steps, val_check_interval=validate_every, limit_val_batches=2,
                        callbacks=[bar], logger=False, enable_checkpointing=False, enable_model_summary=False,
                        default_root_dir=tmp_path)  # fmt: skip
    loader = DataLoader(data, batch_size=8)
    trainer.fit(Classifier(net=net("net2"), optimizer=SGD), loader, loader if validate_every else None)
    assert fed == shown
    assert bar.progress.tasks[bar.train_progress_bar_id].completed == shown[-1] + 1


def test_a_checkpoint_callbacks_state_key_is_lightnings_and_follows_its_settings(tmp_path: Path) -> None:
    """The key a checkpoint stores the callback's state under, kept between hook calls (cnn_exp.callbacks)."""
    ours = callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=200)
    lightnings = LightningModelCheckpoint(dirpath=tmp_path, every_n_train_steps=200)
    assert ours.state_key == lightnings.state_key
    ours.monitor = lightnings.monitor = "val/acc"
    ours.mode = lightnings.mode = "max"
    assert ours.state_key == lightnings.state_key and "val/acc" in ours.state_key
