"""A user's own network, from their own files alone (docs/extend.md): trained, stopped and resumed, tested,
predicted and exported with no edit under cnn_exp/; and a checkpoint that names a class no config names is refused
before its module is imported."""

import copy
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cnn_exp import build
from cnn_exp.errors import UserError
from tests.conftest import MIRROR, NO_FIGURES, QUICK, ROOT, read_metrics

EXTEND = ROOT / "tests" / "extend"


def user(repo: Path, script: str, *overrides: str) -> subprocess.CompletedProcess:
    """A script of cnn-exp's run from the user's repository as the docs say: their modules importable, their
    configs added to Hydra's search path."""
    env = os.environ | {"PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    env.pop("CNN_EXP_DATA_MIRROR", None)
    command = [sys.executable, str(ROOT / script), "--config-dir", str(repo / "conf"), *overrides]
    return subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_network_of_ones_own_trains_resumes_tests_predicts_and_exports(tmp_path: Path, data_dir: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(EXTEND, repo)
    assert "model=net2|net3|resnetlet" in user(repo, "train.py", "--help").stdout  # the help lists one's own too
    paths = [f"paths.data_dir={data_dir}", f"paths.data_mirror={MIRROR}"]
    run_dir = tmp_path / "run"
    stop = ["+callbacks.stop._target_=tests.callbacks.SignalAt", "+callbacks.stop.step=5",
            "+callbacks.stop.signal=SIGTERM"]  # fmt: skip
    settings = [*paths, *QUICK, *NO_FIGURES, "trainer.max_epochs=2", "callbacks.step_checkpoint.every_n_train_steps=3"]
    stopped = user(repo, "train.py", "model=resnetlet", *settings, *stop, f"hydra.run.dir={run_dir}")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    resumed = user(repo, "train.py", f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = read_metrics(run_dir)
    assert result["status"] == "finished" and result["steps"] == 16 and result["settings"]["model"] == "resnetlet"
    # The layer table lists its layers and says what forward() does outside them.
    architecture = (run_dir / "architecture.md").read_text()
    assert "blocks.1" in architecture and "(not listed): adaptive_avg_pool2d, add, flatten, relu." in architecture

    last = run_dir / "checkpoints" / "last.ckpt"
    tested = user(repo, "test.py", f"ckpt_path={last}", *paths, f"hydra.run.dir={tmp_path / 'test'}")
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert read_metrics(tmp_path / "test")["metrics"]["test/acc"] == result["metrics"]["test/acc"]
    images = tmp_path / "images"
    images.mkdir()
    for digit in range(3):  # test images of the subset, saved as files
        from torchvision.datasets import MNIST

        MNIST(str(data_dir), train=False)[digit][0].save(images / f"{digit}.png")
    predicted = user(repo, "test.py", f"ckpt_path={last}", f"predict={images}", f"hydra.run.dir={tmp_path / 'p'}")
    assert predicted.returncode == 0 and (tmp_path / "p" / "predictions.csv").is_file(), predicted.stderr[-3000:]
    exported = user(repo, "test.py", f"ckpt_path={last}", "export=onnx", *paths, f"hydra.run.dir={tmp_path / 'e'}")
    assert exported.returncode == 0 and (tmp_path / "e" / "model.onnx").is_file(), exported.stderr[-3000:]

    # Without the user's configs on the search path, nothing names the class: refused, as a crafted file would be.
    env = os.environ | {"PYTHONPATH": str(repo)}
    command = [sys.executable, str(ROOT / "test.py"), f"ckpt_path={last}", f"hydra.run.dir={tmp_path / 'a'}"]
    alone = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 1 and "Traceback" not in alone.stderr
    assert "hyper_parameters.net._target_=mynets.ResNetlet is not a class this project builds" in alone.stderr

    # A checkpoint naming a class that no config names: refused before its module is imported.
    crafted = copy.deepcopy(torch.load(last, weights_only=True))
    crafted["hyper_parameters"]["net"]["_target_"] = "evil.Payload"
    torch.save(crafted, tmp_path / "crafted.ckpt")
    refused = user(repo, "test.py", f"ckpt_path={tmp_path / 'crafted.ckpt'}", f"hydra.run.dir={tmp_path / 'c'}")
    assert refused.returncode == 1 and "hyper_parameters.net._target_=evil.Payload is not a class" in refused.stderr
    assert not (repo / "imported").exists()


def test_the_docs_show_the_example_files_as_they_are() -> None:
    doc = (ROOT / "docs" / "extend.md").read_text()
    for example in ("mynets.py", "conf/model/resnetlet.yaml"):
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
    build.trust_model("torch.nn.Linear")  # as a config of the run naming it would
    try:
        with pytest.raises(UserError, match=r"_target_=torch\.nn\.Linear does not offer input_shape .*num_classes"):
            build.build({"_target_": "torch.nn.Linear", "in_features": 4, "out_features": 3}, "net", where="model")
    finally:
        build._trusted_models.discard("torch.nn.Linear")
    with pytest.raises(UserError, match=r"model\._target_=builtins\.open is not a class this project builds"):
        build.build({"_target_": "builtins.open", "file": "x"}, "net", where="model")  # no config names it
