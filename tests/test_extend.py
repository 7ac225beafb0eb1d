"""A user's own network, from their own files alone (docs/extend.md): trained, stopped and resumed, tested,
predicted and exported with no edit under cnn_exp/; and a checkpoint that names a class no config names is refused
before its module is imported."""

import copy
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from cnn_exp import build, checkpoints
from cnn_exp.errors import UserError
from tests.conftest import NO_FIGURES, ROOT, make_image_folder, read_metrics

EXTEND = ROOT / "tests" / "extend"


def user(repo: Path, script: str, *overrides: str) -> subprocess.CompletedProcess:
    """A script of cnn-exp's run from the user's repository as the docs say: their modules importable, their
    configs added to Hydra's search path."""
    env = os.environ | {"PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    env.pop("CNN_EXP_DATA_MIRROR", None)
    command = [sys.executable, str(ROOT / script), "--config-dir", str(repo / "conf"), *overrides]
    return subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_network_and_data_of_ones_own_train_resume_test_predict_and_export(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(EXTEND, repo)
    usage = user(repo, "train.py", "--help").stdout  # the help lists one's own options too
    assert "model=net2|net3|resnetlet" in usage and "data=mnist|fashion|folder|stripes" in usage
    run_dir = tmp_path / "run"
    stop = ["+callbacks.stop._target_=tests.callbacks.SignalAt", "+callbacks.stop.step=5",
            "+callbacks.stop.signal=SIGTERM"]  # fmt: skip
    settings = ["model=resnetlet", "data=stripes", *NO_FIGURES, "trainer.max_epochs=2"]
    settings += ["callbacks.step_checkpoint.every_n_train_steps=3", "optimizer=adam"]
    stopped = user(repo, "train.py", *settings, *stop, f"hydra.run.dir={run_dir}")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    resumed = user(repo, "train.py", f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = read_metrics(run_dir)
    assert result["status"] == "finished" and result["steps"] == 12, result  # 192 images, batches of 32, 2 epochs
    assert result["settings"]["model"] == "resnetlet" and result["metrics"]["test/acc"] > 0.6  # of 1/3 by chance
    # The network's shape came from the data: 3×24×24 images, three classes.
    hyper = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]["net"]
    assert (hyper["in_channels"], hyper["image_size"], hyper["num_classes"]) == (3, 24, 3)
    # The layer table lists its layers and says what forward() does outside them.
    architecture = (run_dir / "architecture.md").read_text()
    assert "blocks.1" in architecture and "(not listed): adaptive_avg_pool2d, add, flatten, relu." in architecture

    last = run_dir / "checkpoints" / "last.ckpt"
    tested = user(repo, "test.py", f"ckpt_path={last}", f"hydra.run.dir={tmp_path / 'test'}")
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert read_metrics(tmp_path / "test")["metrics"]["test/acc"] == result["metrics"]["test/acc"]
    images = make_image_folder(tmp_path / "images", per_class=1, size=(30, 30)) / "train" / "class_0"
    predicted = user(repo, "test.py", f"ckpt_path={last}", f"predict={images}", f"hydra.run.dir={tmp_path / 'p'}")
    assert predicted.returncode == 0 and (tmp_path / "p" / "predictions.csv").is_file(), predicted.stderr[-3000:]
    exported = user(repo, "test.py", f"ckpt_path={last}", "export=onnx", f"hydra.run.dir={tmp_path / 'e'}")
    assert exported.returncode == 0 and (tmp_path / "e" / "model.onnx").is_file(), exported.stderr[-3000:]

    # Without the user's configs on the search path, nothing names the classes: refused, as a crafted file would be.
    env = os.environ | {"PYTHONPATH": str(repo)}
    command = [sys.executable, str(ROOT / "test.py"), f"ckpt_path={last}", f"hydra.run.dir={tmp_path / 'a'}"]
    alone = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 1 and "Traceback" not in alone.stderr
    assert "hyper_parameters.net._target_=mynets.ResNetlet is not a class this project builds" in alone.stderr
    # With them on it by Hydra's hydra.searchpath instead of --config-dir: the same test.
    searched = [*command[:-1], f"hydra.searchpath=[file://{repo / 'conf'}]", f"hydra.run.dir={tmp_path / 's'}"]
    tested = subprocess.run(searched, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert read_metrics(tmp_path / "s")["metrics"]["test/acc"] == result["metrics"]["test/acc"]

    # A checkpoint naming a model class that no config names: refused before its module is imported (a DataModule
    # class: test_a_checkpoint_naming_a_datamodule_no_config_names_is_refused_before_its_module_is_imported).
    crafted = copy.deepcopy(torch.load(last, weights_only=True))
    crafted["hyper_parameters"]["net"]["_target_"] = "evil.Payload"
    torch.save(crafted, tmp_path / "crafted.ckpt")
    refused = user(repo, "test.py", f"ckpt_path={tmp_path / 'crafted.ckpt'}", f"hydra.run.dir={tmp_path / 'c'}")
    assert refused.returncode == 1 and "hyper_parameters.net._target_=evil.Payload is not a class" in refused.stderr
    assert not (repo / "imported").exists()


def test_the_docs_show_the_example_files_as_they_are() -> None:
    doc = (ROOT / "docs" / "extend.md").read_text()
    for example in ("mynets.py", "conf/model/resnetlet.yaml", "mydata.py", "conf/data/stripes.yaml"):
        assert (EXTEND / example).read_text() in doc, example


@pytest.mark.slow
def test_pip_install_e_makes_cnn_exp_importable_from_anywhere(tmp_path: Path) -> None:
    """An editable install, as `pip install -e .` makes it (into a folder of its own here), imported elsewhere."""
    pytest.importorskip("setuptools", reason="the build backend pyproject.toml names")
    install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "-e", str(ROOT),
               "--prefix", str(tmp_path / "prefix")]  # fmt: skip
    done = subprocess.run(install, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (site,) = (tmp_path / "prefix" / "lib").glob("python3*/site-packages")
    code = f"import site; site.addsitedir({str(site)!r}); import cnn_exp; print(cnn_exp.__file__, cnn_exp.CONF)"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    shown = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    module, conf = shown.stdout.split()
    assert Path(module) == ROOT / "cnn_exp" / "__init__.py" and (Path(conf) / "train.yaml").is_file()


def test_a_model_without_the_interface_is_refused_naming_what_it_lacks() -> None:
    build.trust("model", "torch.nn.Linear")  # as a config of the run naming it would
    try:
        with pytest.raises(UserError, match=r"_target_=torch\.nn\.Linear does not offer input_shape .*num_classes"):
            build.build({"_target_": "torch.nn.Linear", "in_features": 4, "out_features": 3}, "net", where="model")
    finally:
        build._trusted["model"].discard("torch.nn.Linear")
    with pytest.raises(UserError, match=r"model\._target_=builtins\.open is not a class this project builds"):
        build.build({"_target_": "builtins.open", "file": "x"}, "net", where="model")  # no config names it


def test_a_checkpoint_naming_a_datamodule_no_config_names_is_refused_before_its_module_is_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "payload.py").write_text((EXTEND / "evil.py").read_text())
    crafted = {"datamodule_target": "payload.Payload", "datamodule_hyper_parameters": {"batch_size": 8}}
    with pytest.raises(UserError, match=r"datamodule_target=payload\.Payload is not a class this project builds"):
        checkpoints.check(crafted)
    assert "payload" not in sys.modules and not (tmp_path / "imported").exists()
    with pytest.raises(UserError, match=r"datamodule_target=\['x'\] is not a class this project builds"):
        checkpoints.check({"datamodule_target": ["x"], "datamodule_hyper_parameters": {}})
    # Its settings are checked against the class it names (MNIST's, when it names none: a checkpoint of before).
    with pytest.raises(UserError, match=r"datamodule_hyper_parameters\.root is not a setting of the DataModule"):
        checkpoints.check({"datamodule_hyper_parameters": {"root": "/"}})
    with pytest.raises(UserError, match=r"datamodule_hyper_parameters\.root=5 is not a string"):
        checkpoints.check(
            {"datamodule_target": "cnn_exp.folder.FolderDataModule", "datamodule_hyper_parameters": {"root": 5}}
        )


def test_a_datamodule_without_the_interface_is_refused_naming_what_it_lacks() -> None:
    class Bare(L.LightningDataModule):
        def __init__(self, size: int) -> None:
            super().__init__()
            self.classes = ["a", "b"]

        def test_dataloader(self) -> list:
            return []

    with pytest.raises(UserError, match=r"data\._target_=x\.Bare does not offer input_shape \(the C×H×W"):
        build.check_datamodule(Bare(3), "data._target_=x.Bare")
    shaped = Bare(3)
    shaped.input_shape = (1, 8, 8)
    with pytest.raises(UserError, match=r"does not save its settings \(size\).*self\.save_hyperparameters\(\)"):
        build.check_datamodule(shaped, "data._target_=x.Bare")
    shaped.save_hyperparameters({"size": 3})
    build.check_datamodule(shaped, "data._target_=x.Bare")  # now it offers what train.py needs
    with pytest.raises(UserError, match=r"does not offer load_image .*; normalize"):
        build.check_datamodule(shaped, "data._target_=x.Bare", build.PREDICT_INTERFACE)


class Scores(torch.nn.Module):
    """A network of one's own whose output the test chooses: `out` scores per image, or a tuple of them."""

    def __init__(self, out: int = 10, in_channels: int = 1, as_tuple: bool = False) -> None:
        super().__init__()
        self.input_shape, self.num_classes, self.as_tuple = (1, 28, 28), 10, as_tuple
        self.conv, self.drop = torch.nn.Conv2d(in_channels, 2, 3), torch.nn.Dropout(0.5)
        self.fc = torch.nn.Linear(2 * 26 * 26, out)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple:
        self.calls += 1  # side effects of a forward pass of one's own: a count, and random numbers drawn
        scores = self.fc(self.drop(self.conv(images)).flatten(1)) + 0 * torch.rand(1)
        return (scores, None) if self.as_tuple else scores


def test_a_network_that_does_not_give_a_row_of_class_scores_per_image_is_refused_before_training() -> None:
    """One forward pass of two blank images on a copy of the network, its random numbers from a fork of torch's,
    before the run starts: else the first batch fails deep inside the loss, the metrics or the TensorBoard graph."""
    net = Scores()
    rng = torch.get_rng_state()
    build.check_forward(net, "model._target_=mine.Scores")
    assert net.training and net.calls == 0 and torch.equal(torch.get_rng_state(), rng)
    expected = r"model\._target_=mine\.Scores: forward\(\) must give one row of num_classes=10 class scores per image"
    with pytest.raises(UserError, match=expected + r" \(2 × 10 for 2 images\), but gives a tensor of shape \(2, 12\)"):
        build.check_forward(Scores(out=12), "model._target_=mine.Scores")
    with pytest.raises(UserError, match=expected + r".*, but gives a tuple"):
        build.check_forward(Scores(as_tuple=True), "model._target_=mine.Scores")
    with pytest.raises(UserError, match=r"forward\(\) fails on images of its input_shape 1×28×28: .*3 channels"):
        build.check_forward(Scores(in_channels=3), "model._target_=mine.Scores")


def test_a_class_that_cannot_be_imported_is_named_once_with_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Hydra's import error says why on its second line, and its get_class logs an ERROR record first (printed as a
    second error line): the one message says why, alone."""
    monkeypatch.syspath_prepend(str(EXTEND))
    build.trust("model", "mynets.ResNetlett")
    try:
        with pytest.raises(UserError) as refused:
            build.trusted_class("model", "mynets.ResNetlett", "model._target_")
    finally:
        build._trusted["model"].discard("mynets.ResNetlett")
    assert str(refused.value) == (
        "model._target_=mynets.ResNetlett cannot be imported: Error loading 'mynets.ResNetlett': "
        "ModuleNotFoundError(\"No module named 'mynets.ResNetlett'; 'mynets' is not a package\")"
    )
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
