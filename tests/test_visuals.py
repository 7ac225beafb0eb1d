"""What a user looks at: TensorBoard's run names, tags, HParams, graph and images; a run's epochs.csv and curves.png;
a sweep's swept-key columns, summary.png and mean ± std over seeds; the confusion matrices and image grids, laid out
so that every label fits."""

import csv
import itertools
import json
import math
import os
import statistics
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from cnn_exp import sweep
from cnn_exp.classifier import Classifier
from cnn_exp.data import MNISTDataModule
from cnn_exp.errors import UserError
from cnn_exp.plots import confusion_figure, image_grid, labelled_grid, pixels, sweep_figure
from cnn_exp.reports import EpochTable
from cnn_exp.tensorboard import job_values, short_keys
from tests.conftest import MIRROR, NO_FIGURES, QUICK, composed, read_metrics, run

CURVES = ["acc/train", "acc/val", "loss/train", "loss/val"]


def tensorboard_run(run_dir: Path) -> tuple[str, EventAccumulator]:
    """The run's one TensorBoard run: its folder name (TensorBoard's run name ends in it) and its events."""
    (folder,) = (run_dir / "tensorboard").iterdir()
    events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return folder.name, events


def hparams_of(events: EventAccumulator) -> tuple[plugin_data_pb2.SessionStartInfo, list]:
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    return start, experiment


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_a_run_shows_in_tensorboard_under_its_name_curves_first_with_its_settings_and_layers(trained: Path) -> None:
    name, events = tensorboard_run(trained)
    assert name.startswith("net2-mnist-20")  # model, data, start time
    tags = events.Tags()
    scalars = set(tags["scalars"])
    assert set(CURVES) <= scalars and {"test/acc", "test/loss"} <= scalars
    # TensorBoard orders charts by the text before the first "/": the epoch curves' groups come first.
    assert sorted({tag.split("/")[0] for tag in scalars})[:2] == ["acc", "loss"]
    assert not scalars & {"epoch", "train/acc", "train/loss", "val/acc", "val/loss"}
    assert not any(tag.startswith("hparams/") for tag in scalars)
    metrics = read_metrics(trained)["metrics"]
    for tag, metric in [("acc/val", "val/acc"), ("loss/train", "train/loss"), ("test/acc", "test/acc")]:
        assert events.Scalars(tag)[-1].value == pytest.approx(metrics[metric], rel=1e-6)
    assert len(events.Scalars("acc/val")) == 3  # one a validation epoch

    start, experiment = hparams_of(events)
    hparams = start.hparams
    assert hparams["optimizer.lr"].number_value == pytest.approx(0.1) and "lr" not in hparams  # once, by its key
    assert hparams["seed"].string_value == "7" and hparams["data.val_size"].string_value == "200"  # ints as ints
    assert hparams["model"].string_value == "net2" and hparams["model.padding"].string_value == "0"
    assert hparams["experiment"].string_value == "none"  # a column for every group, chosen or not
    # The HParams metrics are the run's own curves and test results: no copies of them under other tags.
    assert [m.name.tag for m in experiment.metric_infos][:4] == ["acc/val", "loss/val", "test/acc", "test/loss"]
    assert {m.name.tag for m in experiment.metric_infos} <= scalars
    # Set on the command line: shown first (TensorBoard shows 5 hparams until asked), marked as differing.
    shown = [info.name for info in experiment.hparam_infos if info.differs]
    assert {"seed", "data.val_size", "trainer.max_epochs"} <= set(shown)
    assert start.group_name == name

    graph = events.Graph()
    top = {node.name.split("/")[0] for node in graph.node}
    assert {"conv1", "conv1_relu", "conv1_pool", "conv2", "flatten", "fc1", "fc2", "out"} <= top
    assert not any(level.startswith(("Classifier", "ConvNet", "Conv2d[")) for level in top)

    images = set(tags["images"])
    assert {"val/confusion_matrix", "val/confusion_rates", "test/confusion_matrix", "test/confusion_rates"} <= images
    for tag in ("val/confusion_rates", "test/predictions", "test/misclassified"):
        image = events.Images(tag)[-1]
        assert image.width <= 450, "drawn about a TensorBoard card's width, so its text stays legible"


def test_a_run_writes_epochs_csv_and_curves_png_that_agree_with_metrics_json(trained: Path) -> None:
    result = read_metrics(trained)
    rows = read_csv(trained / "epochs.csv")
    assert list(rows[0]) == ["epoch", "train/loss", "train/acc", "val/loss", "val/acc", "lr", "seconds"]
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3] and len(rows) == result["epochs"]
    for name in ("train/loss", "train/acc", "val/loss", "val/acc"):
        assert float(rows[-1][name]) == result["metrics"][name]
    assert len({row["val/acc"] for row in rows}) > 1, "each epoch its own values"
    _, events = tensorboard_run(trained)
    assert [float(row["val/acc"]) for row in rows] == pytest.approx([s.value for s in events.Scalars("acc/val")])
    assert all(float(row["lr"]) == 0.1 and float(row["seconds"]) > 0 for row in rows)
    with Image.open(trained / "curves.png") as image:
        assert image.format == "PNG" and image.width >= 600


def test_curves_png_is_redrawn_at_most_every_redraw_every_seconds_and_after_the_last_epoch(tmp_path: Path) -> None:
    """epochs.csv gains every epoch's row as it ends; curves.png only once redraw_every has passed since it was last
    drawn, and always when training ends or fails, with every row written."""
    data = MNISTDataModule("MNIST", str(tmp_path / "data"), str(MIRROR), batch_size=50, val_size=100)

    class Look(L.Callback):  # after EpochTable's own hook, as each epoch starts: what a user's viewer would show
        def __init__(self) -> None:
            self.seen: list[tuple[int, bytes]] = []

        def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            if trainer.current_epoch:
                self.seen.append((len(read_csv(tmp_path / "epochs.csv")), (tmp_path / "curves.png").read_bytes()))

    table, look = EpochTable(str(tmp_path), redraw_every=3600), Look()
    trainer = L.Trainer(
        max_epochs=3, limit_train_batches=2, limit_val_batches=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[table, look],
    )  # fmt: skip
    trainer.fit(Classifier(net=composed("model", "net2"), optimizer={"_target_": "torch.optim.SGD", "lr": 0.1}), data)
    (rows_1, after_1), (rows_2, after_2) = look.seen
    assert (rows_1, rows_2) == (1, 2) and after_2 == after_1, "epoch 2's row written, its curves not drawn again yet"
    assert len(read_csv(tmp_path / "epochs.csv")) == 3 and (tmp_path / "curves.png").read_bytes() != after_2
    assert table._drawn == table.rows

    class Fail(L.Callback):
        def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            if trainer.current_epoch == 2:
                raise RuntimeError("stopped in epoch 3")

    failing = EpochTable(str(tmp_path / "failed"), redraw_every=3600)
    trainer = L.Trainer(
        max_epochs=3, limit_train_batches=2, limit_val_batches=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[failing, Fail()],
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="stopped in epoch 3"):
        trainer.fit(
            Classifier(net=composed("model", "net2"), optimizer={"_target_": "torch.optim.SGD", "lr": 0.1}), data
        )
    assert len(failing.rows) == 2 and failing._drawn == failing.rows, "a failed run's picture has the rows it wrote"
    for bad in (-1, "often", float("nan")):
        with pytest.raises(UserError, match=r"callbacks.epoch_table.redraw_every=.* must be a number of seconds"):
            EpochTable(str(tmp_path), redraw_every=bad)


def job(sweep_dir: Path, number: int, overrides: list[str], result: dict | None) -> None:
    """A job directory as Hydra and train.py leave it: its overrides, and its metrics.json (None: none written)."""
    (sweep_dir / str(number) / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), sweep_dir / str(number) / ".hydra" / "overrides.yaml")
    if result is not None:
        (sweep_dir / str(number) / "metrics.json").write_text(json.dumps(result))


def finished(val_acc: float, test_acc: float) -> dict:
    metrics = {"val/acc": val_acc, "val/loss": 1 - val_acc, "test/acc": test_acc, "test/loss": 1 - test_acc}
    return {"status": "finished", "metrics": metrics, "epochs": 2, "wall_time_s": 1.0}


def test_a_seed_sweep_gets_key_columns_a_picture_and_mean_and_std_over_seeds(tmp_path: Path) -> None:
    common = ["paths.log_dir=/x", "trainer.max_epochs=2"]
    scores = {(0.05, 1): 0.80, (0.05, 2): 0.90, (0.05, 3): 0.85, (0.1, 1): 0.70, (0.1, 2): 0.75, (0.1, 3): None}
    for number, ((lr, seed), acc) in enumerate(scores.items()):
        failed = {"status": "failed", "error": "training diverged"}
        job(
            tmp_path,
            number,
            [*common, f"optimizer.lr={lr}", f"seed={seed}"],
            failed if acc is None else finished(acc, acc - 0.01),
        )
    untrained = {"images": 40, "classes": 10, "loss": 2.31, "mean_max_softmax": 0.114}
    (tmp_path / "0" / "untrained.json").write_text(json.dumps(untrained))  # as the run's callback writes it
    rows, metric = sweep.summarize(tmp_path, "val/acc")
    text = sweep.write(tmp_path, rows, metric)

    summary = read_csv(tmp_path / "summary.csv")
    assert list(summary[0])[:4] == ["job", "optimizer.lr", "seed", "overrides"]
    for row in summary:
        assert row["overrides"] == f"optimizer.lr={row['optimizer.lr']} seed={row['seed']}"
        expected = scores[(float(row["optimizer.lr"]), int(row["seed"]))]
        assert (float(row["val/acc"]) if row["val/acc"] else None) == expected

    groups = {row["optimizer.lr"]: row for row in read_csv(tmp_path / "seeds.csv")}
    assert list(groups) == ["0.05", "0.1"]  # best mean val/acc first
    assert groups["0.05"]["jobs"] == "3" and groups["0.05"]["seeds"] == "1 2 3"
    assert float(groups["0.05"]["val/acc mean"]) == pytest.approx(0.85)
    assert float(groups["0.05"]["val/acc std"]) == pytest.approx(0.05)  # sample std of 0.80, 0.90, 0.85
    assert float(groups["0.05"]["test/acc mean"]) == pytest.approx(0.84)
    assert groups["0.1"]["jobs"] == "2" and groups["0.1"]["seeds"] == "1 2"  # the failed seed 3 left out
    assert float(groups["0.1"]["val/acc std"]) == pytest.approx(statistics.stdev([0.70, 0.75]))
    assert "| 0.05 | 3 | 1 2 3 | 0.8500 ± 0.0500 |" in text and (tmp_path / "summary.md").read_text() == text

    with Image.open(tmp_path / "summary.png") as image:
        assert image.format == "PNG" and image.width >= 300

    # The sweep's report: the jobs best first, over seeds, each key's effect, the failed job's error.
    report = (tmp_path / "report.md").read_text()
    assert "held fixed: `trainer.max_epochs=2`" in report  # paths.* are where it wrote, not a setting
    assert report.index("| 1 | 0.05 | 2 | 0.9000 |") < report.index("| 0 | 0.05 | 1 | 0.8000 |")
    assert "| 0.05 | 3 | 0.8500 ± 0.0500 | 0.8400 ± 0.0500 |" in report  # over seeds: val/acc, test/acc
    assert "| 0.1 | 2 | 0.7250 ± 0.0354 |" in report  # optimizer.lr's effect over its finished jobs
    assert "- job 5: training diverged" in report
    assert "| 0 | 1 | 2.3100 | 0.1140 |" in report  # before training, per seed
    html = (tmp_path / "report.html").read_text()
    assert 'src="data:image/png;base64,' in html and "training diverged" in html


def test_the_summary_of_a_sweep_without_seeds_has_no_seed_table(tmp_path: Path) -> None:
    for number, (lr, padding) in enumerate([(0.05, 0), (0.05, 2), (0.1, 0), (0.1, 2)]):
        job(tmp_path, number, [f"optimizer.lr={lr}", f"model.padding={padding}"], finished(lr + padding / 10, lr))
    sweep.write(tmp_path, *sweep.summarize(tmp_path, "val/acc"))
    assert list(read_csv(tmp_path / "summary.csv")[0])[:3] == ["job", "optimizer.lr", "model.padding"]
    assert (tmp_path / "summary.png").is_file() and not (tmp_path / "seeds.csv").exists()
    assert "Over seeds" not in (tmp_path / "summary.md").read_text()


def test_two_swept_keys_are_drawn_as_a_heatmap_of_the_mean_over_seeds() -> None:
    values = {"optimizer.lr": [0.1, 0.05, 0.1, 0.05, 0.1], "model.padding": [0, 0, 2, 2, 2]}
    figure = sweep_figure(values, [0.5, 0.6, 0.7, 0.8, 0.9], "val/acc", "title")
    (image,) = figure.axes[0].images
    # Rows: lr 0.05 then 0.1 (numeric order); columns: padding 0, 2. The cell of lr 0.1, padding 2 has two jobs.
    assert image.get_array().tolist() == [[0.6, 0.8], [0.5, 0.8]]
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == ["0.05", "0.1"]
    assert figure.axes[1].get_ylabel() == "val/acc"  # the colour scale
    figure = sweep_figure({"optimizer.lr": [0.05, 0.1, 1]}, [0.9, 0.8, 0.1], "val/acc", "title")
    assert len(figure.axes) == 1 and [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["0.05", "0.1", "1"]


def test_a_job_is_named_by_the_values_its_sweep_varies() -> None:
    overrides = ["paths.data_dir=/d", "data.val_size=200", "optimizer.lr=0.1", "model.padding=2", "+model.dropout=0.5"]
    values = job_values(overrides, ["optimizer.lr", "model.padding", "model.dropout"])
    assert short_keys(values) == {"lr": "0.1", "padding": "2", "dropout": "0.5"}
    assert list(job_values(overrides, None)) == ["data.val_size", "optimizer.lr", "model.padding", "model.dropout"]
    # Two keys ending alike keep their full names.
    assert list(short_keys({"model.padding": 0, "data.padding": 1, "seed": 2})) == [
        "model.padding",
        "data.padding",
        "seed",
    ]


def test_the_sweep_tells_its_jobs_which_keys_it_varies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sweep.SWEPT_KEYS, raising=False)
    task = ["paths.log_dir=/x", "optimizer.lr=0.05,0.1", "seed=range(3)", "model=net2", "data.val_size=200"]
    params = {"data.batch_size": "choice(32, 64)", "optimizer": "sgd"}  # Optuna's search space; a fixed value
    config = OmegaConf.create({"hydra": {"overrides": {"task": task}, "sweeper": {"params": params}}})
    sweep.SweepSummary().on_multirun_start(config)
    assert os.environ[sweep.SWEPT_KEYS] == "optimizer.lr,seed,data.batch_size"


@pytest.mark.slow
def test_a_sweeps_jobs_are_named_and_compared_by_what_they_vary(paths: list[str]) -> None:
    quick = [*QUICK, "++trainer.limit_train_batches=4", *NO_FIGURES]
    run("train.py", "-m", *paths, *quick, "optimizer.lr=0.05,0.1", "seed=1,2")
    log_dir = Path(next(p for p in paths if p.startswith("paths.log_dir=")).partition("=")[2])
    (sweep_dir,) = (log_dir / "train" / "multiruns").iterdir()
    summary = read_csv(sweep_dir / "summary.csv")
    assert len(summary) == 4 and list(summary[0])[:3] == ["job", "optimizer.lr", "seed"]
    results = {}
    for row in summary:
        job_dir = Path(row["run_dir"])
        name, events = tensorboard_run(job_dir)
        assert name == f"lr={row['optimizer.lr']},seed={row['seed']}"
        start, experiment = hparams_of(events)
        assert {info.name for info in experiment.hparam_infos if info.differs} == {"optimizer.lr", "seed"}
        assert start.group_name == f"{name} ({sweep_dir.name}/{job_dir.name})"
        assert start.hparams["seed"].string_value == row["seed"]
        results[(row["optimizer.lr"], row["seed"])] = read_metrics(job_dir)["metrics"]
        assert (job_dir / "epochs.csv").is_file() and (job_dir / "curves.png").is_file()
    for group in read_csv(sweep_dir / "seeds.csv"):
        for metric in ("val/acc", "test/loss"):
            scores = [results[(group["optimizer.lr"], seed)][metric] for seed in ("1", "2")]
            assert float(group[f"{metric} mean"]) == pytest.approx(statistics.fmean(scores))
            assert float(group[f"{metric} std"]) == pytest.approx(statistics.stdev(scores))
    assert (sweep_dir / "summary.png").is_file()
    assert not math.isnan(float(summary[0]["val/acc"]))


def test_a_rate_cell_is_never_printed_as_0_when_images_are_in_it() -> None:
    matrix = torch.zeros(2, 2)
    matrix[0] = torch.tensor([199, 1])  # 0.5 % of class 0 predicted as 1
    matrix[1] = torch.tensor([3, 197])  # 1.5 % and 98.5 %
    figure = confusion_figure(matrix, ["a", "b"], "test set", ["rates"])
    assert {text.get_text() for text in figure.axes[0].texts} == {"100", "1", "2", "99"}  # rounded half up


def test_an_image_grid_draws_each_image_framed_in_its_place_under_a_title_that_fits() -> None:
    """Four to a line, each image in its own square (a bright one stays bright: stretched to its own range), its
    class below it, a wrong prediction in red as `true → predicted`; the title's longest line inside the figure. One
    axes for them all: an axes per image took most of a test report's drawing time."""
    images = torch.zeros(6, 1, 28, 28)
    images[:, :, :14] = 1.0  # the top half bright
    images[5] = -images[5]  # its top half dark: stretched to its own range, the bottom half bright
    labels, predictions = torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([0, 1, 7, 3, 4, 5])
    classes = [f"class {i}" for i in range(10)]
    title = "misclassified test images: true → predicted\n" + "a long line that says which run this was " * 2
    figure = image_grid(images, labels, predictions, classes, title)
    assert len(figure.axes) == 1
    image = pixels(figure)
    height, width = image.shape[:2]
    ax = figure.axes[0]
    boxes = [im.get_window_extent() for im in ax.images]  # display pixels, y up
    assert len(boxes) == 6
    lefts, tops = sorted({round(b.x0) for b in boxes}), sorted({round(b.y1) for b in boxes}, reverse=True)
    assert len(lefts) == 4 and len(tops) == 2  # four to a line, two lines
    for k, box in enumerate(boxes):
        row, column = divmod(k, 4)
        assert (round(box.x0), round(box.y1)) == (lefts[column], tops[row])
        x = int((box.x0 + box.x1) / 2)
        upper, lower = int(height - (box.y1 - 0.25 * box.height)), int(height - (box.y0 + 0.25 * box.height))
        bright, dark = (lower, upper) if k == 5 else (upper, lower)
        assert image[bright, x].min() > 200 and image[dark, x].max() < 50
    frames = [patch.get_window_extent() for patch in ax.patches]
    assert [round(v) for f in frames for v in f.bounds] == [round(v) for b in boxes for v in b.bounds]
    captions = {text.get_text(): text.get_color() for text in ax.texts}
    assert captions == {
        "class 0": "black",
        "class 1": "black",
        "class 2\n→ class 7": "red",
        "class 3": "black",
        "class 4": "black",
        "class 5": "black",
    }
    renderer = figure.canvas.get_renderer()
    (heading,) = figure.texts
    extent = heading.get_window_extent(renderer)
    assert heading.get_text() == title and extent.x0 >= 0 and extent.x1 <= width


def test_an_image_grid_keeps_each_images_shape_and_draws_its_title_as_text() -> None:
    """A colour image and one twice as wide as high (a user's own data) fill their squares' width, centred, framed
    where they landed; a `$` in the title (a data folder's name in it) is a character, not a formula."""
    square = labelled_grid([torch.rand(3, 32, 32), torch.rand(1, 16, 32)], ["cat", "dog"], "two", columns=4)
    pixels(square)
    ax = square.axes[0]
    (colour, wide), frames = ax.images, ax.patches
    assert colour.get_array().shape == (32, 32, 3)
    left, right, bottom, top = wide.get_extent()  # y downwards
    assert right - left == pytest.approx(2 * (bottom - top))
    c_left, c_right, c_bottom, c_top = colour.get_extent()
    assert right - left == pytest.approx(c_right - c_left)  # as wide as the square one
    assert (top + bottom) / 2 == pytest.approx((c_top + c_bottom) / 2)  # centred in its square
    assert frames[1].get_xy() == (left, top) and frames[1].get_height() == pytest.approx(bottom - top)
    title = "test images\nnet on cats_$\\frac$_v2: test accuracy 50.00%"
    figure = image_grid(torch.zeros(1, 1, 4, 4), torch.tensor([0]), torch.tensor([0]), ["a"], title)
    pixels(figure)  # a `$` read as a formula would fail here
    assert figure.texts[0].get_text() == "test images\nnet on cats_\\$\\frac\\$_v2: test accuracy 50.00%"


@pytest.mark.parametrize(
    "classes",
    [
        [str(i) for i in range(10)],
        [f"a rather long class name, number {i}" for i in range(12)],
        [f"class {i}" for i in range(47)],  # EMNIST's balanced split
    ],
)
def test_a_confusion_figure_fits_its_class_names_however_long(classes: list[str]) -> None:
    """Each panel a square matrix with every class name, axis label and title inside the figure, the names apart from
    one another, and its colour scale beside it: the figure grows with the names instead of squeezing the matrix."""
    n = len(classes)
    matrix = torch.diag(torch.full((n,), 980)) + torch.ones(n, n, dtype=torch.long)
    heading = "ResNetlet on MY_FOLDER_OF_CATS_AND_DOGS, AdamW lr 0.001, cosine: test accuracy 91.23%"
    figure = confusion_figure(matrix, classes, "test set", heading=heading)
    pixels(figure)  # drawn: the tick labels placed
    renderer, inside = figure.canvas.get_renderer(), figure.bbox.padded(1)
    (drawn_heading,) = figure.texts
    extent = drawn_heading.get_window_extent(renderer)
    assert drawn_heading.get_text() == heading and inside.contains(extent.x0, extent.y0) and extent.x1 <= inside.x1
    matrices, bars = figure.axes[0::2], figure.axes[1::2]
    assert len(matrices) == len(bars) == 2
    for ax, bar in zip(matrices, bars, strict=True):
        box = ax.get_window_extent(renderer)
        assert box.width == pytest.approx(box.height, abs=1)
        assert bar.get_window_extent(renderer).x0 > box.x1
        labels = [*ax.get_xticklabels(), *ax.get_yticklabels(), ax.xaxis.label, ax.yaxis.label, ax.title]
        labels += [*bar.get_yticklabels(), bar.yaxis.label]
        for label in labels:
            extent = label.get_window_extent(renderer)
            assert inside.contains(extent.x0, extent.y0) and inside.contains(extent.x1, extent.y1), label.get_text()
        rows = sorted((label.get_window_extent(renderer) for label in ax.get_yticklabels()), key=lambda e: e.y0)
        assert all(upper.y0 >= lower.y1 - 1 for lower, upper in itertools.pairwise(rows))
        assert [label.get_text() for label in ax.get_yticklabels()] == classes


def test_an_image_grids_captions_stay_in_their_cells() -> None:
    """Long class names (14 characters, `true → predicted`) are set smaller rather than run into the next image's."""
    classes = ["Weathered boot", "Ankle-high sock", "i"]
    labels, predictions = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 0, 2, 0])
    figure = image_grid(torch.rand(4, 1, 8, 8), labels, predictions, classes, "four")
    pixels(figure)
    renderer, ax = figure.canvas.get_renderer(), figure.axes[0]
    extents = sorted((text.get_window_extent(renderer) for text in ax.texts), key=lambda e: e.x0)
    assert all(right.x0 > left.x1 for left, right in itertools.pairwise(extents))
    assert extents[0].x0 >= 0 and extents[-1].x1 <= figure.bbox.x1
    assert {text.get_fontsize() for text in ax.texts if text.get_text() == "i"} == {9}  # short ones keep their size
