"""Runs that survive a kill, refuse bad input with one clear message, and never run code from a checkpoint."""

import gzip
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from cnn_exp import checkpoints, record, reports
from cnn_exp.assemble import check_run_settings as _check_run_settings
from cnn_exp.callbacks import ModelCheckpoint
from cnn_exp.checkpoints import SafeCheckpointIO
from cnn_exp.classifier import Classifier
from cnn_exp.data import MNISTDataModule
from cnn_exp.errors import UserError
from cnn_exp.net import ConvNet
from cnn_exp.precision import BF16, FP32, auto_precision
from cnn_exp.resume import training_state
from tests.conftest import MIRROR, NO_FIGURES, QUICK, ROOT, assert_no_result, read_metrics, run, run_here

# 800 training images in batches of 50: 16 steps an epoch. step.ckpt every 5 steps. Dropout, shifts and flips
# draw random numbers every step: a resume is exact only if it continues every random stream.
RESUMABLE = [
    "data=fashion",
    "data.shift=2",
    "data.flip=true",
    "model.dropout=0.3",
    "model.batch_norm=true",
    "data.val_size=200",
    "data.batch_size=50",
    "trainer.max_epochs=3",
    "seed=3",
    "callbacks.step_checkpoint.every_n_train_steps=5",
    *NO_FIGURES,
]


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_metrics_of_an_uninterrupted_one(paths: list[str], tmp_path: Path) -> None:
    run("train.py", *paths, *RESUMABLE, f"hydra.run.dir={tmp_path / 'whole'}")
    killed = tmp_path / "killed"
    # A real SIGKILL at step 23: mid-epoch 1, three steps after step.ckpt was written at step 20.
    proc = run(
        "train.py",
        *paths,
        *RESUMABLE,
        "+callbacks.kill._target_=tests.callbacks.SignalAt",
        "+callbacks.kill.step=23",
        "logger=[tensorboard,csv]",
        f"hydra.run.dir={tmp_path / 'started'}",
        check=False,
    )
    assert proc.returncode == -9
    # The run directory is moved before it is resumed: the run must continue where it lies now.
    shutil.move(tmp_path / "started", killed)
    assert read_metrics(killed)["status"] == "running"  # what a killed run leaves: no result
    assert checkpoints.load(killed / "checkpoints" / "step.ckpt")["global_step"] == 20
    assert checkpoints.load(killed / "checkpoints" / "last.ckpt")["global_step"] == 16
    shutil.copy(killed / "checkpoints" / "last.ckpt", tmp_path / "epoch0.ckpt")  # last.ckpt moves on when resumed
    started = (killed / ".hydra" / "overrides.yaml").read_text()

    proc = run("train.py", f"resume={killed}", "trainer.max_epochs=5", check=False)
    assert proc.returncode == 1 and "error: resume= continues a run with its own config" in proc.stderr
    assert "(trainer.max_epochs=5)" in proc.stderr

    run("train.py", f"resume={killed}")
    resumed, whole = read_metrics(killed), read_metrics(tmp_path / "whole")
    assert resumed["status"] == "finished" and resumed["steps"] == whole["steps"] == 48
    assert resumed["metrics"] == whole["metrics"]  # identical, to the last bit, test included
    assert resumed["settings"] == whole["settings"] | {"overrides": resumed["settings"]["overrides"]}
    (tensorboard_run,) = (killed / "tensorboard").iterdir()
    assert len(list(tensorboard_run.glob("events.out.tfevents.*"))) >= 2  # one TensorBoard run, continued
    assert not (tmp_path / "started").exists()  # nothing written where the run was started
    assert resumed["tested"].startswith(str(killed / "checkpoints"))
    assert Path(resumed["best"]["checkpoint"]).name == Path(whole["best"]["checkpoint"]).name
    # A finished run is not resumed again, and its results stay as they are.
    proc = run("train.py", f"resume={killed}", f"hydra.run.dir={tmp_path / 'refused'}", check=False)
    assert proc.returncode == 1 and "this run already finished" in proc.stderr
    assert read_metrics(killed) == resumed
    # The moved run kept ranking its own checkpoints: the same files as the uninterrupted run, no last-v1.ckpt.
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == sorted(
        p.name for p in (tmp_path / "whole" / "checkpoints").iterdir()
    )
    assert (killed / ".hydra" / "overrides.yaml").read_text() == started  # how it was started, kept
    assert len(list((killed / ".hydra").glob("resumed-*/overrides.yaml"))) == 2  # the refused try, the resume
    # Lightning's CSV logger would empty the first part's metrics.csv: it stays, the rest goes beside it.
    assert (killed / "csv" / "metrics.csv").read_text().count("\n") > 2
    assert list((killed / "csv").glob("resumed-*/metrics.csv"))

    # A new run from the epoch-boundary checkpoint trains to the same end.
    run(
        "train.py",
        *paths,
        *RESUMABLE,
        f"ckpt_path={tmp_path / 'epoch0.ckpt'}",
        f"hydra.run.dir={tmp_path / 'new'}",
    )
    again = read_metrics(tmp_path / "new")["metrics"]
    assert {k: again[k] for k in ("train/loss", "train/acc", "val/loss", "val/acc")} == {
        k: whole["metrics"][k] for k in ("train/loss", "train/acc", "val/loss", "val/acc")
    }

    # Killed in the validation at an epoch's end (16 steps an epoch; a step checkpoint every 8 steps): the step
    # checkpoint is not taken at the epoch's last batch, whose validation a resume would skip, and the resume
    # continues from the checkpoint that trained furthest, whatever the files' times say.
    every_8 = [o if not o.startswith("callbacks.step_checkpoint") else "callbacks.step_checkpoint.every_n_train_steps=8"
               for o in RESUMABLE]  # fmt: skip
    in_validation = tmp_path / "in_validation"
    proc = run(
        "train.py", *paths, *every_8, "+callbacks.kill._target_=tests.callbacks.SignalInValidation",
        "+callbacks.kill.step=32", f"hydra.run.dir={in_validation}", check=False,
    )  # fmt: skip
    assert proc.returncode == -9
    assert checkpoints.load(in_validation / "checkpoints" / "step.ckpt")["global_step"] == 24
    assert checkpoints.load(in_validation / "checkpoints" / "last.ckpt")["global_step"] == 16
    os.utime(in_validation / "checkpoints" / "last.ckpt")  # as a copy that did not keep the files' times leaves it
    proc = run("train.py", f"resume={in_validation}")
    header = re.sub(r"\s", "", proc.stdout)  # wrapped to the terminal
    assert f"resumes{in_validation},fromstep.ckpt" in header and "chosendata=fashionmodel=net2" in header
    assert read_metrics(in_validation)["metrics"] == whole["metrics"]


def test_a_moved_run_keeps_ranking_its_own_checkpoints_and_a_new_run_starts_afresh(tmp_path: Path) -> None:
    old, new = tmp_path / "old" / "checkpoints", tmp_path / "new" / "checkpoints"

    def restored(ckpt_path: Path) -> ModelCheckpoint:
        """A checkpoint callback of the run in `new`, after Lightning restored it from the run once in `old`."""
        callback = ModelCheckpoint(dirpath=new, monitor="val/acc", mode="max")
        best, score = str(old / "best-epoch01.ckpt"), torch.tensor(0.35)
        last = str(old / "last.ckpt")
        state = {"dirpath": str(old), "best_model_path": best, "best_model_score": score, "kth_value": score,
                 "best_k_models": {best: score}, "kth_best_model_path": best, "last_model_path": last}  # fmt: skip
        checkpoint = {"callbacks": {callback.state_key: state}}
        callback.on_load_checkpoint(SimpleNamespace(ckpt_path=str(ckpt_path)), None, checkpoint)
        callback.load_state_dict(checkpoint["callbacks"][callback.state_key])
        return callback

    moved = restored(new / "step.ckpt")  # resume= of the moved run: its own file, in its new place
    here = Path(moved.dirpath)
    assert (moved.best_model_path, moved.best_model_score) == (str(here / "best-epoch01.ckpt"), 0.35)
    assert list(moved.best_k_models) == [str(here / "best-epoch01.ckpt")]
    assert moved.last_model_path == str(here / "last.ckpt")
    fresh = restored(old / "last.ckpt")  # train.py ckpt_path= another run's file: a new run ranks afresh
    assert fresh.best_model_score is None and fresh.best_k_models == {} and fresh.last_model_path == ""


@pytest.mark.slow
def test_a_recipe_without_validation_keeps_an_epoch_checkpoint_to_resume_from(paths: list[str], tmp_path: Path) -> None:
    # The notebook recipes train on all images: nothing to rank by, yet every epoch must leave last.ckpt.
    recipe = ["experiment=seed_mnist", "trainer.max_epochs=3", *NO_FIGURES, f"hydra.run.dir={tmp_path}"]
    kill = ["+callbacks.kill._target_=tests.callbacks.SignalAt", "+callbacks.kill.step=25"]  # 10 steps an epoch
    assert run("train.py", *paths, *recipe, *kill, check=False).returncode == -9
    assert checkpoints.load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 20
    run("train.py", f"resume={tmp_path}")
    result = read_metrics(tmp_path)
    assert result["status"] == "finished" and result["steps"] == 30 and result["tested"] == "final weights"


@pytest.mark.parametrize("recorded", ["other", "64-true"])
def test_a_resumed_run_keeps_the_precision_it_started_in(recorded: str, trained: Path, tmp_path: Path) -> None:
    """A requeued job may land on another kind of node: a run whose precision auto_precision chose goes on in the one
    it started in. The record is input: a value auto_precision could not have chosen is not taken, and this machine's
    choice applies."""
    here = auto_precision("auto")
    started = {"other": FP32 if here == BF16 else BF16, "64-true": "64-true"}[recorded]
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    config.trainer.precision = "${auto_precision:${.accelerator}}"  # as the recipes chosen in bf16 set it
    config.trainer.max_epochs = 4  # one epoch left to train
    OmegaConf.save(config, run_dir / ".hydra" / "config.yaml")
    unfinished = read_metrics(run_dir) | {"status": "running"}
    unfinished["settings"]["precision"] = started
    record.write(run_dir, unfinished)
    run("train.py", f"resume={run_dir}")
    resumed = read_metrics(run_dir)
    expected = here if recorded == "64-true" else started
    assert resumed["status"] == "finished" and resumed["epochs"] == 4
    assert OmegaConf.load(run_dir / "config.yaml").trainer.precision == expected  # what the Trainer was given
    assert resumed["settings"]["precision"] == expected


@pytest.mark.slow
def test_a_resume_of_a_wrong_directory_writes_nothing_into_it(paths: list[str], tmp_path: Path) -> None:
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "not_a_run" / "notes.txt").write_text("mine")
    proc = run("train.py", f"resume={tmp_path / 'not_a_run'}", f"paths.log_dir={tmp_path / 'outputs'}", check=False)
    assert proc.returncode == 1 and "not a run directory of train.py" in proc.stderr
    assert [p.name for p in (tmp_path / "not_a_run").iterdir()] == ["notes.txt"]


def test_checkpoints_and_metrics_are_replaced_whole_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "last.ckpt"
    SafeCheckpointIO().save_checkpoint({"global_step": 1, "weights": torch.ones(3)}, target)

    def torn(obj: object, f: object) -> None:  # the write dies half-way, as in a kill or a full disk
        f.write(b"\x80\x02half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(UserError, match=r"cannot write the checkpoint .*No space"):
        SafeCheckpointIO().save_checkpoint({"global_step": 2}, target)
    assert checkpoints.load(target)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]

    record.write(tmp_path, {"status": "finished"})

    def full_disk(fd: int) -> None:  # the text is written, but cannot reach the disk
        raise OSError("No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        record.write(tmp_path, {"status": "running", "epochs": 3})
    assert read_metrics(tmp_path) == {"status": "finished"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "metrics.json"]  # no temporary file left


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    """A real filesystem of 4 MB of its own (tmpfs), as a nearly full disk; skipped where it cannot be mounted."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small filesystem here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


@pytest.mark.slow
@pytest.mark.parametrize("leave", [0, 100_000], ids=["full", "part-way"])  # a checkpoint takes ~147 KB
def test_a_full_disk_fails_the_run_in_one_line_with_its_checkpoints_whole(
    paths: list[str], tmp_path: Path, small_disk: Path, leave: int
) -> None:
    run_dir, filler = small_disk / "run", small_disk / "filler"
    fill = [
        "+callbacks.fill._target_=tests.callbacks.FillDisk",
        f"+callbacks.fill.path={filler}",
        "+callbacks.fill.step=10",
        f"+callbacks.fill.once={tmp_path / 'once'}",
        f"+callbacks.fill.leave={leave}",
    ]
    command = [*paths, *QUICK, *NO_FIGURES, "trainer.max_epochs=2", "callbacks.step_checkpoint.every_n_train_steps=3"]
    proc = run("train.py", *command, *fill, f"hydra.run.dir={run_dir}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot write the checkpoint {run_dir / 'checkpoints' / 'step.ckpt'}: No space")
    assert line.endswith(f"continue the run with resume={run_dir}")
    failed = read_metrics(run_dir)  # rewritten in place: there was no room for a second copy
    assert failed["status"] == "failed" and failed["error"] == line.removeprefix("error: ")
    saved = sorted((run_dir / "checkpoints").iterdir())
    assert [p.name for p in saved] == ["best-epoch00.ckpt", "last.ckpt", "step.ckpt"]
    assert [checkpoints.load(p)["global_step"] for p in saved] == [8, 8, 9]  # whole, as they were
    filler.unlink()
    run("train.py", f"resume={run_dir}")
    assert read_metrics(run_dir)["status"] == "finished"


def write_labels(path: Path, labels: torch.Tensor) -> None:
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">II", 0x0801, len(labels)) + labels.to(torch.uint8).numpy().tobytes())


@pytest.fixture
def damaged(tmp_path: Path) -> callable:
    """A mirror copy of the MNIST subset with one file replaced."""

    def make(kind: str) -> Path:
        mirror = tmp_path / "mirror"
        shutil.copytree(MIRROR / "MNIST", mirror / "MNIST")
        raw = mirror / "MNIST" / "raw"
        if kind == "truncated":
            with gzip.open(raw / "train-images-idx3-ubyte.gz") as f:
                data = f.read()
            with gzip.open(raw / "train-images-idx3-ubyte.gz", "wb") as f:
                f.write(data[: len(data) // 2])
        else:  # labels for 999 of the 1,000 images
            write_labels(raw / "train-labels-idx1-ubyte.gz", torch.zeros(999))
        return mirror

    return make


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimizer.lrr=0.1"], "Could not override 'optimizer.lrr'"),
        (["optimizer.lr=0"], "error: optimizer.lr=0 must be positive"),
        (["optimizer.lr=-0.1"], "error: optimizer.lr=-0.1 must be positive"),
        (["data.batch_size=-5"], "error: data.batch_size=-5 must be a positive number of images"),
        (["data.val_size=-1"], "error: data.val_size=-1 must be 0"),
        (["data.shift=28"], "error: data.shift=28 must be below the images' 28 pixels"),
        (["data.val_size=1000"], "error: data.val_size=1000 leaves no training images (the set has 1000)"),
        (["model=net3", "model.kernel_size=5", "model.padding=0"], "error: model: the feature map vanishes at conv3"),
        (["model.padding=[1,1,1]"], "error: model.padding=[1, 1, 1] has 3 values but the network has 2 conv layers"),
        (["resume=/nonexistent/run"], "error: resume=/nonexistent/run: not a run directory of train.py"),
        (["data.val_size=0", "callbacks=[default,early_stopping]"], "error: callbacks.early_stopping stops on val/acc"),
        (["classifier.flip_average=true"], "error: classifier.flip_average=true mirrors images"),
        (["+classifier.mixup=0.2"], "error: classifier.mixup is not a setting of the classifier"),
        # seed_mnist tunes callbacks.model_checkpoint, which callbacks=none does not define
        (["experiment=seed_mnist", "callbacks=none"], "error: callbacks.model_checkpoint sets monitor, filename"),
        # Refused before training, where torch or Lightning would fail with a traceback or a misleading message.
        (["optimizer.lr=nan"], "error: optimizer.lr=nan must be positive (and finite)"),
        (["optimizer.lr=inf"], "error: optimizer.lr=inf must be positive (and finite)"),
        (["optimizer.weight_decay=-1"], "is refused by torch: Invalid weight_decay value: -1"),
        (["scheduler=step", "scheduler.step_size=0"], "error: scheduler.step_size=0: the schedule divides by it"),
        (["scheduler=cosine", "scheduler.T_max=0"], "error: scheduler.T_max=0: the schedule divides by it"),
        (
            ["optimizer.lr=1e39"],
            "error: optimizer (SGD lr=1e+39, momentum=0.0, nesterov=False, weight_decay=0.0): a rate",
        ),
        (["optimizer.weight_decay=1e39"], "weight_decay=1e+39): a rate or decay beyond float32's range"),
        (["model.batch_norm=true", "classifier.norm_lr_scale=1e308"], "× classifier.norm_lr_scale=1e+308): a rate"),
        (["optimizer=muon", "model.batch_norm=true", "optimizer.muon_lr=1e39"], "beyond float32's range"),
        (
            ["scheduler=step", "scheduler.gamma=-1"],
            "error: scheduler.gamma=-1: a learning rate or its factor must be 0",
        ),
        (["scheduler=triangular", "scheduler.max_lr=-0.5"], "error: scheduler.max_lr=-0.5: a learning rate or its"),
        (["scheduler=cosine", "scheduler.eta_min=-1"], "error: scheduler.eta_min=-1: a learning rate or its factor"),
        (["scheduler=cosine", "trainer.max_epochs=-1", "+trainer.max_steps=20"], "error: scheduler.T_max=-1: a length"),
        (
            [
                "model=net3",
                "model.pool_first=true",
                "model.batch_norm=true",
                "model.padding=0",
                "data.val_size=200",
                "data.batch_size=1",
            ],
            "of one image",
        ),
        (["trainer.log_every_n_steps=0"], "error: trainer.log_every_n_steps=0 must be a whole number of at least 1"),
        (["++trainer.limit_train_batches=0"], "error: trainer.limit_train_batches=0 trains on no batch"),
        (["threads=1000000"], "error: threads=1000000 is more than this machine's"),
        (["model.channels=[100000,100000]"], "error: model: the network would have 250,194,707,990 parameters"),
        (["model.num_classes=5"], "error: the data has 10 classes, but the network has model.num_classes=5"),
        (
            ["data.val_size=200", "++trainer.limit_val_batches=0.01"],
            "error: trainer.limit_val_batches=0.01 leaves none of the 2 validation batches: give at least 0.5",
        ),
    ],
)
def test_bad_settings_get_one_clear_message(
    overrides: list[str], message: str, paths: list[str], tmp_path: Path
) -> None:
    # In-process: that the script prints such an error as its one line is test_cli's.
    with pytest.raises((SystemExit, ConfigCompositionException)) as stopped:
        run_here("train.py", tmp_path / "run", *paths, *overrides)
    assert message in str(stopped.value)
    assert_no_result(tmp_path / "run", message)


@pytest.mark.parametrize(
    ("kind", "message", "fix"),
    [
        ("truncated", "images-idx3-ubyte.gz is truncated: its header announces 1000 images", "fix or replace it in"),
        ("miscounted", "disagree: 1000 images but 999 labels", "delete them, and the next run copies them again"),
    ],
)
def test_damaged_data_files_get_one_clear_message(
    kind: str, message: str, fix: str, damaged: callable, tmp_path: Path
) -> None:
    mirror = damaged(kind)
    overrides = [f"paths.data_dir={tmp_path / 'data'}", f"paths.data_mirror={mirror}", *QUICK]
    with pytest.raises(SystemExit) as stopped:
        run_here("train.py", tmp_path / "run", *overrides)
    assert message in str(stopped.value) and fix in str(stopped.value)
    assert_no_result(tmp_path / "run", str(stopped.value))


def test_a_diverging_loss_fails_the_run_at_once(paths: list[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="error: training diverged: the loss became"):
        run_here("train.py", tmp_path, *paths, *QUICK, "optimizer.lr=1e6")
    result = read_metrics(tmp_path)
    assert result["status"] == "failed" and "training diverged" in result["error"] and "metrics" not in result
    assert result["steps"] < 8  # stopped within the first epoch of 8 steps, not after it
    assert result["error"].endswith("Lower optimizer.lr (now 1000000.0) or choose another optimizer.")


def test_a_divergence_names_every_setting_that_makes_the_rates(paths: list[str], tmp_path: Path) -> None:
    given = ["model.batch_norm=true", "classifier.norm_lr_scale=1e30"]
    with pytest.raises(SystemExit) as stopped:
        run_here("train.py", tmp_path, *paths, *QUICK, *given)
    assert "Lower optimizer.lr (now 0.1) or classifier.norm_lr_scale (now 1e+30) or choose" in str(stopped.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=net3"], "the checkpoint holds another network than this run's: model.channels: [6, 12] in the"),
        (["data=fashion"], "the checkpoint was trained on MNIST, this run asks for FashionMNIST"),
        (["optimizer=adam"], "the checkpoint continues its own optimizer (SGD lr=0.1, momentum=0.0"),
        (["trainer.max_epochs=3"], "has already trained to trainer.max_epochs=3: nothing left to train"),
    ],
)
def test_a_checkpoint_of_another_model_or_dataset_is_refused(
    overrides: list[str], message: str, trained: Path, paths: list[str], tmp_path: Path
) -> None:
    ckpt = trained / "checkpoints" / "last.ckpt"
    # `trained` ran 3 epochs: 5 leaves some to train, unless a case sets its own.
    epochs = [] if any(o.startswith("trainer.max_epochs=") for o in overrides) else ["trainer.max_epochs=5"]
    with pytest.raises(SystemExit) as stopped:
        run_here("train.py", tmp_path, *paths, "data.val_size=200", *epochs, *overrides, f"ckpt_path={ckpt}")
    assert message in str(stopped.value)


def test_a_checkpoint_continues_only_with_its_own_optimizer_and_schedule_and_epochs_left(
    trained: Path, tmp_path: Path
) -> None:
    path = trained / "checkpoints" / "last.ckpt"
    checkpoint = checkpoints.load(path)
    saved = checkpoint["hyper_parameters"]
    cosine = {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "_partial_": True, "T_max": 5}
    for optimizer, scheduler, message in [
        (
            {**saved["optimizer"], "lr": 0.01},
            None,
            r"its own optimizer \(SGD lr=0.1, .*\), not this run's \(SGD lr=0.01",
        ),
        (saved["optimizer"], cosine, r"its own scheduler \(none\), not this run's \(CosineAnnealingLR T_max=5"),
    ]:
        with pytest.raises(UserError, match=message):
            Classifier(saved["net"], optimizer, scheduler).on_load_checkpoint(checkpoint)
    Classifier(saved["net"], saved["optimizer"], saved["scheduler"]).on_load_checkpoint(checkpoint)  # the same: fine
    # `trained` ran epochs 0-2: up to max_epochs=2 nothing is left (max_epochs=3 is caught after fit, above).
    with pytest.raises(UserError, match=r"has already trained to trainer\.max_epochs=2: nothing left to train"):
        training_state(str(path), 2)
    assert training_state(str(path), 5)["global_step"] == checkpoint["global_step"]
    plain = tmp_path / "weights.pt"
    torch.save({"conv1.weight": torch.zeros(6, 1, 5, 5)}, plain)
    with pytest.raises(UserError, match=r"is not a checkpoint written by train\.py"):
        training_state(str(plain), 5)


def test_values_of_the_wrong_kind_are_named() -> None:
    with pytest.raises(UserError, match=r"optimizer\.lr=abc must be positive"):
        Classifier({"_target_": "cnn_exp.net.ConvNet"}, {"_target_": "torch.optim.SGD", "lr": "abc"})
    with pytest.raises(UserError, match=r"callbacks\.test_report\.samples=-1 must be a count"):
        reports.TestReport(dirpath=".", samples=-1)
    with pytest.raises(UserError, match=r"callbacks\.confusion_matrix\.every_n_epochs=-1 must be a number of epochs"):
        reports.ConfusionMatrix(every_n_epochs=-1)
    with pytest.raises(UserError, match=r"model\.dropout=abc must be at least 0 and below 1"):
        ConvNet(dropout="abc")
    with pytest.raises(UserError, match=r"data\.shift=1\.5 must be 0 \(off\) or a whole number of pixels"):
        MNISTDataModule("MNIST", shift=1.5)
    with pytest.raises(UserError, match=r"data\.mean=abc and data\.std=0\.3081 must be numbers"):  # MNIST's std
        MNISTDataModule("MNIST", mean="abc")
    with pytest.raises(UserError, match=r"model\.padding=abc must be one int or a list of 2 ints"):
        ConvNet(padding="abc")
    for seed, threads, message in (("abc", None, "seed=abc must be"), (-1, None, "seed=-1 must be"),
                                   (0, 0, "threads=0 must be"), (0, "abc", "threads=abc must be")):  # fmt: skip
        with pytest.raises(UserError, match=message):
            _check_run_settings(OmegaConf.create({"seed": seed, "threads": threads, "trainer": {}}))
    _check_run_settings(OmegaConf.create({"seed": 2**32 - 1, "threads": None, "trainer": {"max_epochs": 1}}))
    for key, value in (("max_epochs", 0), ("max_epochs", True), ("max_steps", -2)):
        with pytest.raises(UserError, match=rf"trainer\.{key}={value} must be a whole number of at least 1"):
            _check_run_settings(OmegaConf.create({"seed": 0, "threads": None, "trainer": {key: value}}))


class Payload:
    """Unpickling this runs a shell command: what a malicious 'checkpoint' carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train.py", "test.py"])
def test_a_checkpoint_that_would_run_code_is_refused(script: str, paths: list[str], tmp_path: Path) -> None:
    marker, crafted = tmp_path / "pwned", tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": Payload(marker)}, crafted)
    torch.load(crafted, weights_only=False)  # an unsafe load runs the payload: the test's file is real
    assert marker.exists()
    marker.unlink()
    proc = run(script, *paths, f"ckpt_path={crafted}", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 1 and f"error: ckpt_path={crafted} refused" in proc.stderr
    assert not marker.exists()


def test_damaged_and_missing_checkpoints_are_named(tmp_path: Path) -> None:
    broken = tmp_path / "broken.ckpt"
    for junk in (b"PK\x03\x04 not really a zip", b"hello: a text file, not a checkpoint\n"):
        broken.write_bytes(junk)
        with pytest.raises(UserError, match=f"ckpt_path={broken} cannot be read"):
            checkpoints.load(broken)
    with pytest.raises(UserError, match="no such file"):
        checkpoints.load(tmp_path / "nope.ckpt")


@pytest.mark.slow
def test_a_run_writes_only_inside_its_data_and_output_directories(paths: list[str], tmp_path: Path) -> None:
    def files() -> set[Path]:
        # The repo's own data/ and outputs/ count too: a run given other paths must not write there either.
        skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}
        return {p for p in ROOT.rglob("*") if not skip & set(p.relative_to(ROOT).parts)}

    before = files()
    run("train.py", *paths, *QUICK, f"hydra.run.dir={tmp_path / 'run'}")
    assert files() == before


@pytest.mark.slow
def test_a_run_directory_of_crafted_files_is_refused_without_harm(paths: list[str], tmp_path: Path) -> None:
    """A lock file that is a link (filelock would open and empty what it points to) and a metrics.json that is a FIFO
    (reading it would wait forever): each refused in one line, in a second or two."""
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / ".lock").symlink_to(precious)
    proc = run("train.py", *paths, *QUICK, f"hydra.run.dir={linked}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {linked / '.lock'} is a link, not a lock file: " + (
        "delete the link (a run's lock is a plain file it makes itself)"
    )
    assert precious.read_text() == "keep me"
    assert sorted(p.name for p in linked.iterdir()) == [".lock"]  # nothing written into it

    piped = tmp_path / "piped"
    (piped / ".hydra").mkdir(parents=True)
    (piped / ".hydra" / "config.yaml").write_text("seed: 0\n")
    os.mkfifo(piped / "metrics.json")
    proc = run("train.py", f"resume={piped}", f"paths.log_dir={tmp_path / 'outputs'}", check=False)
    assert proc.returncode == 1 and f"error: resume={piped}: not a run directory of train.py" in proc.stderr


@pytest.mark.slow
def test_a_directory_of_a_run_that_never_started_is_not_taken_over(paths: list[str], tmp_path: Path) -> None:
    """What a run stopped while it started leaves (Hydra's record, no metrics.json): test.py and train.py are refused
    there with advice that holds, and it is left as it was."""
    never = tmp_path / "never"
    (never / ".hydra").mkdir(parents=True)
    (never / ".hydra" / "config.yaml").write_text("seed: 0\n")
    for script, given in (("test.py", f"ckpt_path={tmp_path / 'any.ckpt'}"), ("train.py", "data.val_size=200")):
        proc = run(script, *paths, given, f"hydra.run.dir={never}", check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert (
            f"error: {never} already holds a run" in proc.stderr
            and "never got as far as its metrics.json" in proc.stderr
        )
    assert (never / ".hydra" / "config.yaml").read_text() == "seed: 0\n"
    assert sorted(p.name for p in never.iterdir()) == [".hydra", ".lock"]
