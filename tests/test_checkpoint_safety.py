"""A checkpoint is input: it never decides what code runs or what gets deleted, and one that cannot continue a run is
refused before training, leaving the run's record as it was. last.ckpt always holds the newest epoch's end.

The crafted files start from one real run of train.py, shared by the whole module.
"""

import collections
import contextlib
import copy
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from lightning.pytorch import callbacks as lightning_callbacks
from omegaconf import OmegaConf

import cnn_exp
from cnn_exp import build, checkpoints, resume, rundir
from cnn_exp.callbacks import ModelCheckpoint
from cnn_exp.checkpoints import SafeCheckpointIO
from cnn_exp.classifier import Classifier
from cnn_exp.data import MNISTDataModule
from cnn_exp.errors import UserError
from cnn_exp.errors import plain as _plain
from cnn_exp.lookahead import Lookahead
from cnn_exp.reports import EpochTable
from tests.conftest import MIRROR, MNIST_SHAPE, ROOT, read_metrics, run

# Network2 with a learning rate so high that its best epoch is its first: 2 epochs of 8 steps (800 images in batches
# of 100). step.ckpt every 5 steps, saved as Lightning's save_weights_only=true writes it: weights, no training state.
HIGH_LR = [
    "data.val_size=200",
    "trainer.max_epochs=2",
    "seed=7",
    "optimizer.lr=0.5",
    "test=false",
    "logger=csv",
    "callbacks.step_checkpoint.every_n_train_steps=5",
    "+callbacks.step_checkpoint.save_weights_only=true",
]


@pytest.fixture(scope="module")
def high_lr(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("high_lr")
    run("train.py", f"paths.data_dir={data_dir}", f"paths.data_mirror={MIRROR}", f"hydra.run.dir={run_dir}", *HIGH_LR)
    return run_dir


@pytest.fixture
def last(high_lr: Path) -> dict[str, Any]:
    """The run's last.ckpt, as plain data to craft from."""
    return torch.load(high_lr / "checkpoints" / "last.ckpt", weights_only=True)


def opener(marker: Path) -> dict[str, Any]:
    """Settings that Hydra's instantiate turns into open(marker, "w"): a call that leaves a file behind."""
    return {"_target_": "builtins.open", "file": str(marker), "mode": "w"}


def unfinished(run_dir: Path, to: Path) -> Path:
    """A copy of a finished run made to look killed, with one more epoch left to train: what resume= continues."""
    shutil.copytree(run_dir, to)
    config = OmegaConf.load(to / ".hydra" / "config.yaml")
    config.trainer.max_epochs = 3
    OmegaConf.save(config, to / ".hydra" / "config.yaml")
    record = read_metrics(to)
    record["status"] = "interrupted"
    del record["metrics"]
    (to / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    return to


def name_files(checkpoint: dict[str, Any], folder: Path, name: str) -> None:
    """Make every checkpoint callback's state in `checkpoint` name `name` as its files, recorded in `folder`."""
    for key, state in checkpoint["callbacks"].items():
        if not key.startswith("ModelCheckpoint"):  # other callbacks keep their own state (the epoch table's rows)
            continue
        state |= {"dirpath": str(folder), "best_model_path": name, "kth_best_model_path": name}
        if state["monitor"]:  # the best-by-val/acc callback: its ranking and last.ckpt
            score = torch.tensor(0.0)
            state |= {"best_k_models": {name: score}, "kth_value": score, "best_model_score": score}
            state["last_model_path"] = name


@pytest.mark.slow
def test_last_ckpt_is_the_newest_epoch_even_when_an_earlier_one_was_best(high_lr: Path) -> None:
    last = checkpoints.load(high_lr / "checkpoints" / "last.ckpt")
    best = checkpoints.load(read_metrics(high_lr)["best"]["checkpoint"])
    assert best["epoch"] == 0  # the high learning rate made the first epoch the best...
    assert (last["epoch"], last["global_step"]) == (1, 16)  # ...and last.ckpt is still the end of the last one


# (what to craft, the key path the refusal names)
CRAFTED = {
    "net": (lambda c, m: c["hyper_parameters"].update(net=opener(m)), "hyper_parameters.net._target_=builtins.open"),
    "net value": (
        lambda c, m: c["hyper_parameters"]["net"].update(channels=opener(m)),
        "hyper_parameters.net.channels._target_",
    ),
    "optimizer": (
        lambda c, m: c["hyper_parameters"].update(optimizer=opener(m)),
        "hyper_parameters.optimizer._target_=builtins.open",
    ),
    "optimizer value": (
        lambda c, m: c["hyper_parameters"]["optimizer"].update(betas=opener(m)),
        "hyper_parameters.optimizer.betas._target_",
    ),
    "optimizer value in a list": (
        lambda c, m: c["hyper_parameters"]["optimizer"].update(betas=[0.9, opener(m)]),
        "hyper_parameters.optimizer.betas[1]._target_",
    ),
    "scheduler": (
        lambda c, m: c["hyper_parameters"].update(scheduler=opener(m)),
        "hyper_parameters.scheduler._target_=builtins.open",
    ),
    "classifier setting": (
        lambda c, m: c["hyper_parameters"].update(label_smoothing=opener(m)),
        "hyper_parameters.label_smoothing=",
    ),
    "data setting": (
        lambda c, m: c["datamodule_hyper_parameters"].update(classes=opener(m)),
        "datamodule_hyper_parameters.classes._target_",
    ),
    "data settings": (
        lambda c, m: c.update(datamodule_hyper_parameters=opener(m)),
        "datamodule_hyper_parameters._target_",
    ),
    "Lightning's instantiator": (
        lambda c, m: c["hyper_parameters"].update(_instantiator="builtins.open", file=str(m)),
        "hyper_parameters._instantiator is not a setting of the model",
    ),
    "Lightning's old key": (lambda c, m: c.update(hparams={"net": opener(m)}), "hparams: settings under a key"),
    "Lightning's settings type": (
        lambda c, m: c.update(hparams_type=collections.OrderedDict),  # a class torch's safe load does build
        "hparams_type is not a name",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CRAFTED)
def test_a_checkpoint_whose_settings_name_code_is_refused_before_anything_is_built(
    case: str, last: dict[str, Any], tmp_path: Path
) -> None:
    craft, key_path = CRAFTED[case]
    marker, path = tmp_path / "marker", tmp_path / "crafted.ckpt"
    crafted = copy.deepcopy(last)
    craft(crafted, marker)
    torch.save(crafted, path)
    # The file is real: Hydra, building what it names, calls open() and leaves the marker.
    for node in (*crafted["hyper_parameters"].values(), crafted["datamodule_hyper_parameters"]):
        with contextlib.suppress(Exception):  # each on its own: one that fails stops Hydra before the next
            instantiate(node)
    with contextlib.suppress(Exception):
        instantiate(crafted.get("hparams", {}))
    if case not in ("Lightning's instantiator", "Lightning's settings type"):  # these two would call other things
        assert marker.exists()
        marker.unlink()

    refusal = re.escape(f"ckpt_path={path} refused: {key_path}")
    with pytest.raises(UserError, match=refusal):
        checkpoints.load(path)
    with pytest.raises(UserError, match=refusal):  # Lightning's own reads (resume, test of the best checkpoint)
        SafeCheckpointIO().load_checkpoint(path)
    if case in ("net", "net value", "optimizer", "optimizer value", "scheduler"):
        # A path that skipped the check (Lightning's load_from_checkpoint reads the file itself) builds nothing either.
        where = key_path.removeprefix("hyper_parameters.").replace("net.", "model.", 1).split("=")[0]
        with pytest.raises(UserError, match=re.escape(where)):
            Classifier.load_from_checkpoint(path, weights_only=True).configure_optimizers()
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("script", ["test.py", "train.py"])
def test_the_entry_points_refuse_it_in_one_line(script: str, last: dict[str, Any], tmp_path: Path) -> None:
    marker, path = tmp_path / "marker", tmp_path / "crafted.ckpt"
    last["hyper_parameters"]["optimizer"]["betas"] = opener(marker)
    torch.save(last, path)
    proc = run(script, f"ckpt_path={path}", "trainer.max_epochs=5", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"error: ckpt_path={path} refused: hyper_parameters.optimizer.betas._target_ is" in proc.stderr
    assert not marker.exists()


def test_configs_build_their_classes_without_hydra_and_name_what_they_may_not() -> None:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        for optimizer, scheduler in (("sgd", "none"), ("adam", "cosine"), ("adamw", "step")):  # every option once
            cfg = compose("train", overrides=[f"optimizer={optimizer}", f"scheduler={scheduler}"])
            model = Classifier(
                build.with_data_shape(_plain(cfg.model), MNIST_SHAPE), _plain(cfg.optimizer), _plain(cfg.scheduler)
            )
            built = model.configure_optimizers()
            built = built if isinstance(built, dict) else {"optimizer": built}
            assert type(built["optimizer"]).__name__.lower() == optimizer
            assert (scheduler == "none") == ("lr_scheduler" not in built)
        cfg = compose("train", overrides=["+optimizer.momentum._target_=builtins.print"])
        with pytest.raises(UserError, match=r"^optimizer\.momentum\._target_ is an instruction"):
            Classifier(
                build.with_data_shape(_plain(cfg.model), MNIST_SHAPE), _plain(cfg.optimizer), _plain(cfg.scheduler)
            )
    net = {"_target_": "cnn_exp.net.ConvNet"}
    sgd = {"_target_": "torch.optim.SGD", "lr": 0.1}
    for settings, message in [
        ({"_target_": "os.system"}, r"model\._target_=os\.system is not a class this project builds"),
        ({**net, "kernel_size": "5"}, r"model\.kernel_size='5' is not a whole number or a list"),
        ({**net, "pool_first": "no"}, r"model\.pool_first='no' is not true or false"),
        ({**net, "_args_": [1]}, r"model\._args_ is an instruction"),
    ]:
        with pytest.raises(UserError, match=message):
            Classifier(settings, sgd)
    for scheduler, message in [
        ({"_target_": "torch.optim.lr_scheduler.LambdaLR", "lr_lambda": "x"}, r"scheduler\.lr_lambda='x' is not"),
        ({"_target_": "torch.optim.lr_scheduler.StepLR", "step_size": True}, r"step_size=True is not a whole number"),
        ({"_target_": "torch.optim.SGD"}, r"scheduler\._target_=torch\.optim\.SGD is not a class"),
    ]:
        with pytest.raises(UserError, match=message):
            Classifier(net, sgd, scheduler)


@pytest.mark.slow
def test_a_checkpoint_may_name_only_files_in_its_own_folder(last: dict[str, Any], tmp_path: Path) -> None:
    folder, path = tmp_path / "run" / "checkpoints", tmp_path / "crafted.ckpt"
    for name in (f"{folder}/../../victim.txt", str(tmp_path / "victim.txt"), "relative.ckpt", "s3://bucket/x.ckpt"):
        crafted = copy.deepcopy(last)
        name_files(crafted, folder, name)
        torch.save(crafted, path)
        with pytest.raises(UserError, match=re.escape("refused: callbacks.ModelCheckpoint{'monitor'")) as refused:
            checkpoints.load(path)
        assert f"_model_path={name!r} lies outside {str(folder)!r}" in str(refused.value)
    # An old checkpoint that Lightning upgrades: the upgrade moves its file name into the callback's state.
    old = {"pytorch-lightning_version": "0.9.0", "epoch": 0, "global_step": 0, "state_dict": {}}
    torch.save(old | {"checkpoint_callback_best_model_path": "/victim"}, path)
    with pytest.raises(UserError, match=r"best_model_path='/victim' names a file, but callbacks\.ModelCheckpoint"):
        checkpoints.load(path)


def test_checkpoint_io_deletes_only_files_in_a_folder_it_saved_to(tmp_path: Path) -> None:
    folder, elsewhere = tmp_path / "run" / "checkpoints", tmp_path / "elsewhere"
    elsewhere.mkdir(parents=True)
    victim = elsewhere / "victim.ckpt"
    victim.write_text("precious")
    io = SafeCheckpointIO()
    io.save_checkpoint({"step": 1}, folder / "a.ckpt")
    (folder / "link").symlink_to(elsewhere)
    (folder / "to-victim.ckpt").symlink_to(victim)
    (folder / "sub").mkdir()
    for name in (folder / "link" / "victim.ckpt", folder / ".." / ".." / "elsewhere" / "victim.ckpt", victim):
        io.remove_checkpoint(name)
    io.remove_checkpoint(folder / "sub")
    io.remove_checkpoint(folder / "to-victim.ckpt")  # the link goes, what it points to stays
    assert victim.read_text() == "precious" and (folder / "sub").is_dir()
    assert not (folder / "to-victim.ckpt").is_symlink()
    io.remove_checkpoint(folder / "a.ckpt")
    assert not (folder / "a.ckpt").exists()


def test_restored_state_keeps_only_names_that_resolve_inside_its_folder(tmp_path: Path) -> None:
    folder, elsewhere = tmp_path / "checkpoints", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    (folder / "link").symlink_to(elsewhere)
    victim, own = elsewhere / "victim.ckpt", str(folder / "best-epoch01.ckpt")
    victim.write_text("precious")
    callback = ModelCheckpoint(dirpath=folder, monitor="val/acc", mode="max", save_last=True)
    via_link, low, high = str(folder / "link" / "victim.ckpt"), torch.tensor(0.1), torch.tensor(0.5)
    callback.load_state_dict(
        {
            "dirpath": callback.dirpath,
            "best_model_path": via_link,
            "best_model_score": low,
            "current_score": low,
            "best_k_models": {via_link: low, own: high},
            "kth_best_model_path": via_link,
            "kth_value": low,
            "last_model_path": via_link,
        }
    )
    # The link's name is gone; the ranking stays consistent (Lightning looks the k-th best up in best_k_models).
    assert callback.best_k_models == {own: high} and callback.last_model_path == f"{callback.dirpath}/last.ckpt"
    assert (callback.best_model_path, callback.kth_best_model_path) == (own, own)
    callback._remove_checkpoint(None, via_link)  # the deletion itself refuses it too
    assert victim.read_text() == "precious"


@pytest.mark.slow
def test_lightnings_own_checkpoint_callback_deletes_nothing_outside(
    last: dict[str, Any], data_dir: Path, tmp_path: Path
) -> None:
    """callbacks=none: Lightning's default ModelCheckpoint, which removes the file its state names at its next save."""
    folder, elsewhere = tmp_path / "checkpoints", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    (folder / "link").symlink_to(elsewhere)
    victim = elsewhere / "victim.ckpt"
    victim.write_text("precious")
    default = lightning_callbacks.ModelCheckpoint(dirpath=folder)  # what Lightning adds, where it adds it
    state = default.state_dict() | {"best_model_path": str(folder / "link" / "victim.ckpt")}
    last["callbacks"] = {default.state_key: state}
    torch.save(last, tmp_path / "crafted.ckpt")
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_epochs=3, logger=False, plugins=[SafeCheckpointIO()],
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    model = Classifier(**last["hyper_parameters"])
    data = MNISTDataModule(**last["datamodule_hyper_parameters"] | {"data_dir": str(data_dir), "mirror": str(MIRROR)})
    trainer.fit(model, datamodule=data, ckpt_path=tmp_path / "crafted.ckpt")
    assert trainer.global_step == 24 and Path(trainer.checkpoint_callback.dirpath).resolve() == folder.resolve()
    assert victim.read_text() == "precious"


@pytest.mark.slow
def test_a_resumed_run_never_deletes_a_file_its_checkpoint_names_outside(high_lr: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "victim.ckpt"
    victim.write_text("precious")

    # Through `..`: refused before anything, the run's record as it was.
    refused = unfinished(high_lr, tmp_path / "dotdot")
    folder = refused / "checkpoints"
    crafted = torch.load(folder / "last.ckpt", weights_only=True)
    name_files(crafted, folder, f"{folder}/../../elsewhere/victim.ckpt")
    torch.save(crafted, folder / "last.ckpt")
    record = (refused / "metrics.json").read_text()
    proc = run("train.py", f"resume={refused}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"error: ckpt_path={folder / 'last.ckpt'} refused: callbacks.ModelCheckpoint" in proc.stderr
    assert (refused / "metrics.json").read_text() == record and victim.read_text() == "precious"

    # Through a link inside the folder that leads out of the run: the run is not resumed, the file stays (names
    # resolved through links are dropped as a state is restored: test_restored_state_keeps_only_names_that_resolve...).
    linked = unfinished(high_lr, tmp_path / "linked")
    folder = linked / "checkpoints"
    (folder / "old").symlink_to(elsewhere)
    crafted = torch.load(folder / "last.ckpt", weights_only=True)
    name_files(crafted, folder, str(folder / "old" / "victim.ckpt"))
    torch.save(crafted, folder / "last.ckpt")
    record = (linked / "metrics.json").read_text()
    proc = run("train.py", f"resume={linked}", check=False)
    assert proc.returncode == 1 and f"error: {folder / 'old'} is a link to {elsewhere}, outside" in proc.stderr
    assert (linked / "metrics.json").read_text() == record and victim.read_text() == "precious"


# What Lightning finds only once training has begun; resume.check_fits finds before: (what to change, message)
MISFITS = {
    "another network's weights": (
        lambda c: c["state_dict"].update({"net.conv1.weight": torch.zeros(3, 1, 5, 5)}),
        "holds weights of another network than this run's: net.conv1.weight: [3, 1, 5, 5] in the checkpoint, "
        "[6, 1, 5, 5] here",
    ),
    "an optimizer state for fewer parameters": (
        lambda c: c["optimizer_states"][0]["param_groups"][0]["params"].pop(),
        "its optimizer state does not fit this run's network",
    ),
    "an optimizer setting of the wrong kind": (
        lambda c: c["optimizer_states"][0]["param_groups"][0].update(lr="fast"),
        "optimizer_states[0].param_groups[0].lr='fast' is not of the kind the optimizer takes",
    ),
    "a momentum of the wrong shape": (
        lambda c: c["optimizer_states"][0]["state"].update({0: {"momentum_buffer": torch.zeros(7)}}),
        "its optimizer state momentum_buffer of parameter 0 has shape [7], the parameter [6, 1, 5, 5]",
    ),
    "a schedule the run does not have": (
        lambda c: c["lr_schedulers"].append({"last_epoch": 1}),
        "lr_schedulers holds 1 scheduler states, the run has 0",
    ),
    "another dataset": (
        lambda c: c["MNISTDataModule"].update(dataset="FashionMNIST"),
        "was trained on FashionMNIST, this run asks for MNIST",
    ),
    "no loop state": (lambda c: c.pop("loops"), "has no loops: it is not a training state written by train.py"),
    "a random state of seven numbers": (
        lambda c: c.update(rng_state=torch.zeros(7)),
        "the checkpoint's rng_state is not a state of torch's random number generator",
    ),
    "a data position past the training's": (
        lambda c: c["MNISTDataModule"].update(batches=10**12),
        "its data position (epoch 1, batch 1000000000000) is not where its training stopped (epoch 1, batch 8)",
    ),
    "an epoch table's seconds as text": (
        lambda c: c["callbacks"]["EpochTable"].update(running={"epoch": 3, "seconds": "abc"}),
        "its epoch table's running epoch is not a row of numbers",
    ),
    "an epoch table row of escape sequences": (
        lambda c: c["callbacks"]["EpochTable"]["rows"].append({"epoch": "\x1b[2J\x1b]0;forged\x07"}),
        "its epoch table's rows are not rows of numbers under epoch, train/loss",
    ),
    "Lookahead's slow weights as text": (
        lambda c: c["callbacks"].update(Lookahead={"slow": "abc"}),
        "the checkpoint's Lookahead state holds no slow weights (a list of tensors)",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", MISFITS)
def test_a_checkpoint_that_cannot_continue_the_run_is_refused_before_training(case: str, last: dict[str, Any]) -> None:
    model, data = Classifier(**last["hyper_parameters"]), MNISTDataModule(**last["datamodule_hyper_parameters"])
    callbacks = [EpochTable, Lookahead]  # the classes a run's config names, which check their own states
    resume.check_fits(last, "last.ckpt", model, data, callbacks)  # the real one fits
    change, message = MISFITS[case]
    change(last)
    with pytest.raises(UserError, match=re.escape(message)):
        resume.check_fits(last, "last.ckpt", model, data, callbacks)


@pytest.mark.slow
def test_weights_only_are_refused_before_training_and_the_run_stays_as_it_was(high_lr: Path, tmp_path: Path) -> None:
    """step.ckpt, written with Lightning's save_weights_only=true, holds no training state: a resume continues from
    last.ckpt, even where step.ckpt counts more steps, and is refused where step.ckpt is all there is."""
    resumed = unfinished(high_lr, tmp_path / "run")
    step = resumed / "checkpoints" / "step.ckpt"
    weights = checkpoints.load(step)
    assert "optimizer_states" not in weights  # Lightning's own weights-only file
    torch.save(weights | {"global_step": 99}, step)  # further than last.ckpt's 16 steps, by its count
    proc = run("train.py", f"resume={resumed}")
    assert f"{step} holds no training state to continue from (weights only): continuing from" in proc.stdout
    assert read_metrics(resumed)["status"] == "finished" and read_metrics(resumed)["steps"] == 24

    alone = unfinished(high_lr, tmp_path / "alone")
    (alone / "checkpoints" / "last.ckpt").unlink()
    (alone / "checkpoints" / "best-epoch00.ckpt").unlink(missing_ok=True)
    record = (alone / "metrics.json").read_text()
    proc = run("train.py", f"resume={alone}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    step = alone / "checkpoints" / "step.ckpt"
    assert f"error: ckpt_path={step} holds weights only (saved with save_weights_only=true)" in proc.stderr
    assert (alone / "metrics.json").read_text() == record


@pytest.mark.slow
@pytest.mark.parametrize("name", ["architecture.md", "train.log"])
def test_a_run_with_a_link_leading_out_is_not_resumed_through_it(name: str, high_lr: Path, tmp_path: Path) -> None:
    """A run writes its files by name: a link in its directory (architecture.md, which the layer table rewrites, or
    train.log, which Hydra appends to before the run starts) would have it write outside. Refused before Hydra writes
    anything there."""
    resumed = unfinished(high_lr, tmp_path / "run")
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (resumed / name).unlink()
    (resumed / name).symlink_to(precious)
    record, hydra = (resumed / "metrics.json").read_text(), sorted((resumed / ".hydra").iterdir())
    proc = run("train.py", f"resume={resumed}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: {resumed / name} is a link to {precious}, outside the run directory")
    )
    assert precious.read_text() == "keep me"
    assert (resumed / "metrics.json").read_text() == record and sorted((resumed / ".hydra").iterdir()) == hydra


def test_links_within_a_run_directory_are_its_own(tmp_path: Path) -> None:
    """A link leading out of the directory, of the folders the project writes in by name (wherever in it their links
    lead) or of TensorBoard's run folders, a loop of links and a hard link are refused; a link within it (Lightning's
    save_last=link) is not, nor one in a tracker's own folder, nor a run directory reached through a link."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step.ckpt").write_bytes(b"")
    (run_dir / "checkpoints" / "last.ckpt").symlink_to("step.ckpt")
    (tmp_path / "reached").symlink_to(run_dir)
    assert rundir.outside_link(run_dir) is None and rundir.outside_link(tmp_path / "reached") is None
    (run_dir / "wandb" / "logs").mkdir(parents=True)  # a tracker's own folder: wandb links its logs to ~/.cache
    (run_dir / "wandb" / "logs" / "debug-core.log").symlink_to(tmp_path)
    assert rundir.outside_link(run_dir) is None and rundir.outside_link(tmp_path / "reached") is None
    (run_dir / "checkpoints" / "events").symlink_to(tmp_path)
    assert rundir.outside_link(run_dir).startswith(f"{run_dir / 'checkpoints' / 'events'} is a link to {tmp_path},")
    (run_dir / "checkpoints" / "events").unlink()
    # TensorBoard's run folder, reached through a link within the run: a resume writes its events there.
    (run_dir / "store" / "version_0").mkdir(parents=True)
    (run_dir / "tensorboard").symlink_to("store")
    (run_dir / "store" / "version_0" / "hparams.yaml").symlink_to(tmp_path / "elsewhere.yaml")
    assert rundir.outside_link(run_dir).startswith(f"{run_dir / 'store' / 'version_0' / 'hparams.yaml'} is a link")
    (run_dir / "store" / "version_0" / "hparams.yaml").unlink()
    (run_dir / ".hydra").symlink_to(".hydra")  # Hydra would fail on it with a traceback
    assert (
        rundir.outside_link(run_dir)
        == f"{run_dir / '.hydra'} is a loop of links, which a run cannot write through: delete it"
    )
    (run_dir / ".hydra").unlink()
    (tmp_path / "elsewhere.log").write_text("keep me")
    (run_dir / "train.log").hardlink_to(tmp_path / "elsewhere.log")  # Hydra appends to train.log by its name
    assert rundir.outside_link(run_dir).startswith(f"{run_dir / 'train.log'} is a hard link")


def _nested(depth: int) -> list:
    """A list inside a list, `depth` levels down."""
    top = current = []
    for _ in range(depth):
        current.append([])
        current = current[0]
    return top


def _save_deep(value: Any, path: Path) -> None:
    """torch.save of a value nested deeper than Python's recursion allows by default, as a crafter would."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10**6)
    threading.stack_size(2**29)
    try:
        saver = threading.Thread(target=torch.save, args=(value, path))
        saver.start()
        saver.join()
    finally:
        threading.stack_size(0)
        sys.setrecursionlimit(limit)


def _craft(last: dict[str, Any], case: str, path: Path) -> str:
    """Write a crafted checkpoint for `case` to `path`; return what its refusal says."""
    crafted: Any = copy.deepcopy(last)
    if case in ("a list", "a tensor", "None"):
        crafted = {"a list": [1, 2], "a tensor": torch.zeros(3), "None": None}[case]
        torch.save(crafted, path)
        kind = {"a list": "a list", "a tensor": "a Tensor", "None": "a NoneType"}[case]
        return f"ckpt_path={path} is not a checkpoint written by train.py: it holds {kind}, not a mapping"
    if case == "5 class names":
        crafted["datamodule_hyper_parameters"]["classes"] = list("abcde")
        torch.save(crafted, path)
        return "datamodule_hyper_parameters.classes names 5 classes, but the network has 10 outputs"
    if case == "10 outputs, 5 classes built":
        crafted["hyper_parameters"]["net"]["num_classes"] = 5
        torch.save(crafted, path)
        return "state_dict holds other weights than hyper_parameters.net describes: net.out.bias: [10] stored, [5]"
    if case == "200,000 levels deep":
        crafted["hyper_parameters"]["net"]["channels"] = _nested(200_000)
        _save_deep(crafted, path)
        return f"ckpt_path={path} refused: it nests values more than 32 levels deep"
    if case in ("pending losses as text", "a pending step of no images", "pending steps of 2**62 images"):
        counts = [2**62] * 4 if "2**62" in case else [50, 0]  # four of them would overflow to 0 when summed
        pending = {"losses": torch.tensor([2.3] * len(counts)), "images": torch.tensor(counts)}
        crafted[checkpoints.PENDING_LOSSES] = {"losses": "2.3", "images": [50]} if "text" in case else pending
        torch.save(crafted, path)
        return f"{checkpoints.PENDING_LOSSES} is not a list of training steps' losses and image counts"
    if case in ("pending counts on the meta device", "sparse pending counts"):
        counts = torch.tensor([4, 4]).to_sparse()
        if "meta" in case:
            counts = torch.empty(2, dtype=torch.int64, device="meta")
        crafted[checkpoints.PENDING_LOSSES] = {"losses": torch.tensor([2.3, 2.2]), "images": counts}
        torch.save(crafted, path)
        kind = "meta" if "meta" in case else "sparse_coo"
        return f"{checkpoints.PENDING_LOSSES}.images is a {kind} tensor: train.py writes dense real numbers only"
    if case in ("a metric state as text", "a weight named by a number"):
        if "text" in case:
            crafted["state_dict"]["train_loss.mean_value"] = "x"
        else:
            crafted["state_dict"][5] = torch.zeros(1)
        torch.save(crafted, path)
        return "state_dict is not a mapping of names to tensors"
    if case in ("complex weights", "whole-number weights"):
        dtype = torch.complex64 if "complex" in case else torch.int64
        crafted["state_dict"]["net.out.bias"] = torch.zeros(10, dtype=dtype)
        torch.save(crafted, path)
        if "complex" in case:
            return "state_dict.net.out.bias is a complex tensor"
        return "net.out.bias: torch.int64 stored, torch.float32 built"
    if case in ("1 GB expanded from one number", "one list referred to 1000**5 times"):
        bomb: Any = torch.zeros(1).expand(2**28)
        if "list" in case:
            bomb = [0]
            for _ in range(5):
                bomb = [bomb] * 1000  # shared references: a few KB of pickle
        crafted["notes"] = bomb
        torch.save(crafted, path)
        if "list" in case:
            return f"ckpt_path={path} refused: it holds more than {checkpoints.MAX_VALUES:,} values"
        return "its tensors hold 1,024 MB of numbers, more than the file's"
    if case == "a key of tuples referred to 2**20 times":
        key: Any = (0,)
        for _ in range(20):
            key = (key, key)  # shared: a few hundred bytes of pickle, 2**20 paths
        crafted["notes"] = {key: 1}
        torch.save(crafted, path)
        return f"ckpt_path={path} refused: it holds more than {checkpoints.MAX_VALUES:,} values"
    if case == "compressed parts":  # 64 MB of zeros in about 64 KB (1 GB in 1 MB): torch's reader inflates them
        crafted["notes"] = torch.zeros(2**24)
        torch.save(crafted, tmp := path.with_suffix(".tmp"))
        with zipfile.ZipFile(tmp) as plain, zipfile.ZipFile(path, "w") as deflated:
            for entry in plain.infolist():
                deflated.writestr(entry.filename, plain.read(entry), compress_type=zipfile.ZIP_DEFLATED)
        tmp.unlink()
        assert path.stat().st_size < 2**20
        return "refused: its parts are compressed, which torch.save never does"
    if case == "10 million class names":
        crafted["datamodule_hyper_parameters"]["classes"] = ["x"] * 10**7
        torch.save(crafted, path)
        return "MB beside the weights, more than the 4 MB allowed (train.py writes a few KB)"
    raise AssertionError(case)


CASES = ["a list", "a tensor", "None", "5 class names", "10 outputs, 5 classes built", "200,000 levels deep",
         "10 million class names", "pending losses as text", "a pending step of no images",
         "pending steps of 2**62 images", "pending counts on the meta device", "sparse pending counts",
         "a metric state as text", "a weight named by a number", "complex weights", "whole-number weights",
         "1 GB expanded from one number", "one list referred to 1000**5 times", "compressed parts",
         "a key of tuples referred to 2**20 times"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_a_checkpoint_of_plain_values_that_do_not_fit_is_refused_at_once_in_one_line(
    case: str, last: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "crafted.ckpt"
    message = _craft(last, case, path)
    began = time.perf_counter()
    with pytest.raises(UserError) as refused:
        checkpoints.load(path)
    assert time.perf_counter() - began < 2
    assert message in str(refused.value)
    one_line = ("a list", "5 class names", "200,000 levels deep", "sparse pending counts", "a weight named by a number")
    if case in one_line:  # as test.py prints it: one line, no traceback
        proc = run("test.py", f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'run'}", check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines() == [f"error: {refused.value}"]


@pytest.mark.slow
def test_settings_that_would_build_a_huge_network_are_refused_before_any_memory_is_taken(
    last: dict[str, Any], tmp_path: Path
) -> None:
    """A 150 KB file whose image_size would make fc1 355 million weights: refused on the meta device, with the
    peak memory of the process that loads it measured (a fresh process, as test.py and cnn_exp.load are)."""
    crafted = copy.deepcopy(last)
    crafted["hyper_parameters"]["net"]["image_size"] = 2000
    path = tmp_path / "huge.ckpt"
    torch.save(crafted, path)
    assert path.stat().st_size < 200_000
    code = (
        "import resource, cnn_exp\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        f"    cnn_exp.load({str(path)!r})\n"
        "except cnn_exp.predict.UserError as err:\n"
        "    print(err)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    refusal, grown = done.stdout.strip().splitlines()
    assert int(grown) < 100, f"the refusal took {grown} MB more memory"
    assert "state_dict holds other weights than hyper_parameters.net describes: net.fc1.weight" in refusal


# A training state written by train.py at commit 62d8d00 (Network2, one epoch of the MNIST subset), before the builder,
# the training-state checks and ModelCheckpoint moved, and while conf/optimizer still held `_partial_: true`.
OLD = ROOT / "tests" / "data" / "checkpoints" / "62d8d00-net2-mnist-last.ckpt"


@pytest.mark.slow
def test_a_checkpoint_of_an_earlier_version_still_loads_tests_and_trains_on(paths: list[str], tmp_path: Path) -> None:
    assert checkpoints.load(OLD)["hyper_parameters"]["optimizer"]["_partial_"] is True
    model = cnn_exp.load(OLD)
    assert model.classes == [str(digit) for digit in range(10)] and model.dataset == "MNIST"
    run("test.py", *paths[:2], f"ckpt_path={OLD}", f"hydra.run.dir={tmp_path / 'test'}")
    # What test.py at 62d8d00 measured on this checkpoint and the test subset, to the bit.
    assert read_metrics(tmp_path / "test")["metrics"] == {
        "test/loss": 2.294067621231079,
        "test/acc": 0.14499999582767487,
    }
    # Today's configs hold no `_partial_`: the same optimizer all the same, so its training goes on.
    run("train.py", *paths, f"ckpt_path={OLD}", "data.val_size=200", "trainer.max_epochs=2", "test=false",
        f"hydra.run.dir={tmp_path / 'train'}")  # fmt: skip
    trained = read_metrics(tmp_path / "train")
    assert trained["status"] == "finished" and trained["steps"] == 16


@pytest.mark.parametrize(
    "old, new",
    [("cnn_exp.checkpoints.ModelCheckpoint", "cnn_exp.callbacks.ModelCheckpoint")]
    + [
        (f"cnn_exp.callbacks.{name}", f"cnn_exp.reports.{name}")
        for name in ("UntrainedScores", "ConfusionMatrix", "TestReport", "EpochTable")
    ]
    + [("cnn_exp.callbacks.LayerTable", "cnn_exp.layers.LayerTable")],
)
def test_the_callbacks_an_earlier_runs_config_names_still_resolve(old: str, new: str) -> None:
    """A run directory started before these moved names them so in its .hydra/config.yaml, which resume= builds."""
    assert get_class(old) is get_class(new)
