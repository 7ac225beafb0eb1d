"""Shared fixtures: the small real datasets in tests/data, and train.py / test.py run the way a user runs them.

`python -m pytest` runs the whole suite on every core (pytest-xdist, `-n auto` in pyproject.toml); `-m "not slow"`
leaves out the tests that take more than ~5 s (mark such a test `@pytest.mark.slow`), and `-n 0` runs in one
process. Tests that must run a script as a user does use `run()`; the rest run the task in this process
(`run_here()`, Hydra's compose API) or call what they test directly.
"""

import copy
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from filelock import FileLock
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image

from cnn_exp import build
from cnn_exp import run as tasks
from tests import forkserver

tasks.setup()  # as train.py and test.py do, for the configs the tests compose

ROOT = Path(__file__).resolve().parents[1]
# The first 1,000 training and 200 test images of each dataset, written by tests/make_data.py.
MIRROR = ROOT / "tests" / "data"
# Small and quick: 800 training and 200 validation images.
QUICK = ["data.val_size=200", "trainer.max_epochs=1"]
# Without the figures a run draws in TensorBoard and beside its results (tests/test_visuals.py and test_callbacks.py
# look at those): drawing them is most of a small run's time. The test's confusion_matrix.png is still drawn.
NO_FIGURES = [
    "callbacks.confusion_matrix.every_n_epochs=0",
    "callbacks.test_report.samples=0",
    "callbacks.test_report.misclassified=0",
    "callbacks.layer_table.draw=false",
    "report.enabled=false",
]
# One torch thread per process: pytest -n runs a test per core, and more threads than cores only fight for them.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
torch.set_num_threads(1)  # this process too: its tests train in-process, beside another worker's


def user_env(one_thread: bool = True, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a script runs in: `env` (default: this one) without the user's data-mirror variable, and
    with one torch thread unless `one_thread=False` (then torch picks its own number, as for a user)."""
    env = {k: v for k, v in (os.environ if env is None else env).items() if k != "CNN_EXP_DATA_MIRROR"}
    env = {k: v for k, v in env.items() if k not in ONE_THREAD}
    return env | ONE_THREAD if one_thread else env


def start(
    script: str, *overrides: str, one_thread: bool = True, env: dict[str, str] | None = None, code: str | None = None
) -> forkserver.Process:
    """Start an entry script from the project root (or `python -c code *overrides`) and return at once: a real
    process of its own, forked from one that has done the imports already (tests/forkserver.py)."""
    return _SERVER.start([script, *overrides] if code is None else list(overrides), user_env(one_thread, env), code)


def run(
    script: str,
    *overrides: str,
    check: bool = True,
    one_thread: bool = True,
    env: dict[str, str] | None = None,
    cold: bool = False,
) -> subprocess.CompletedProcess:
    """Run an entry script from the project root, as the README does, and wait for it (see `start`).

    `cold=True` starts it with a plain `python script ...` instead, imports and all.
    """
    if cold:
        proc = subprocess.run(
            [sys.executable, script, *overrides], cwd=ROOT, env=user_env(one_thread, env),
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    else:
        child = start(script, *overrides, one_thread=one_thread, env=env)
        try:
            child.wait(timeout=600)
        finally:
            child.kill()
        proc = child.result()
    if check and proc.returncode:
        raise AssertionError(
            f"{script} {' '.join(overrides)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


# Started with the environment the scripts get, less the thread setting each child makes for itself.
_SERVER = forkserver.Server(ROOT, user_env(one_thread=False))


def run_here(script: str, run_dir: Path, *overrides: str) -> Any:
    """Run what `script` (train.py, test.py) runs, in this process, on the config the script composes.

    For what a subprocess proves nothing more about, such as a setting refused before or while training: as in
    the script, a mistake of the user's ends it with SystemExit("error: ..."), the message the script prints.
    A setting Hydra cannot compose raises Hydra's ConfigCompositionException. `run_dir` stands for hydra.run.dir.
    """
    task = {"train.py": tasks.train, "test.py": tasks.test}[script]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(Path(script).stem, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as Hydra hands a task its config
    environ = dict(os.environ)  # Lightning's seed_everything leaves its seed there
    try:
        return task(cfg)
    finally:
        HydraConfig.instance().cfg = None
        os.environ.clear()
        os.environ.update(environ)


def read_metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text())


def assert_no_result(run_dir: Path, error: str) -> None:
    """A run stopped by bad input leaves nothing that looks like a result.

    Settings that Hydra or the model reject stop it before it starts: no metrics.json. What only the data reveals
    stops it once started: metrics.json says failed, with the error, and has no metrics.
    """
    if (run_dir / "metrics.json").exists():
        result = read_metrics(run_dir)
        assert result["status"] == "failed" and "metrics" not in result
        assert error.removeprefix("error: ") in result["error"]


def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder the pytest-xdist workers of one run share (the documented pattern), else this run's own."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data directory for the run: the first run fills it from tests/data, later runs find it full.

    Workers fill it at the same time; each file is copied whole or not at all (MNISTDataModule.prepare_data).
    """
    path = shared(tmp_path_factory) / "data"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture
def paths(tmp_path: Path, data_dir: Path) -> list[str]:
    """Overrides that keep a run's data and outputs inside pytest's temporary folders."""
    return [f"paths.data_dir={data_dir}", f"paths.data_mirror={MIRROR}", f"paths.log_dir={tmp_path / 'outputs'}"]


# The `trained` run: Network2 on the MNIST subset, 3 epochs, with a validation split.
TRAINED = ["data.val_size=200", "trainer.max_epochs=3", "trainer.log_every_n_steps=4", "seed=7"]


@pytest.hookimpl(tryfirst=True)  # before -m "not slow" deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs the `trained` run is slow: training it takes longer than any quick test.

    Slow tests run first (each file's in their order): the workers then end on quick ones together, instead of
    one finishing a long test while the other waits.
    """
    for item in items:
        if "trained" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """One finished `train.py` run, shared by the tests that inspect a run's outputs (they only read it).

    The first worker to need it trains it; the others wait on the lock and find it done.
    """
    folder = shared(tmp_path_factory)
    run_dir = folder / "trained"
    with FileLock(folder / "trained.lock"):
        if not run_dir.exists():
            run(
                "train.py",
                f"paths.data_dir={data_dir}",
                f"paths.data_mirror={MIRROR}",
                f"hydra.run.dir={run_dir}",
                *TRAINED,
            )
    if not (run_dir / "metrics.json").is_file() or read_metrics(run_dir)["status"] != "finished":
        pytest.fail(f"the shared `trained` run in {run_dir} did not finish (see the first test that used it)")
    return run_dir


def composed(group: str, name: str, **overrides: object) -> dict:
    """One config group's option as Hydra composes it (its defaults list included: net3 extends net2, fashion
    extends mnist), with `overrides` merged in, resolved to plain values."""
    cfg = copy.deepcopy(_composed_train(group, name))
    with open_dict(cfg):
        cfg[group] = OmegaConf.merge(cfg[group], overrides)
    settings = OmegaConf.to_container(cfg[group], resolve=True)
    # A model's shape settings left null are the data's (train.py takes them from data=mnist, the default).
    return build.with_data_shape(settings, MNIST_SHAPE) if group == "model" else settings


# What data=mnist says of its images, for models built without data (build.with_data_shape).
MNIST_SHAPE = SimpleNamespace(input_shape=(1, 28, 28), classes=[str(digit) for digit in range(10)])


def make_image_folder(
    root: Path, classes: int = 3, per_class: int = 40, size: tuple[int, int] = (32, 32), mode: str = "RGB",
    test: int = 0, seed: int = 0,
) -> Path:  # fmt: skip
    """An ImageFolder layout of generated images a small network learns in an epoch or two: class k is stripes at
    k × 60 degrees in a random colour on a random background, with noise. `test` images a class go to test/."""
    generator = torch.Generator().manual_seed(seed)
    height, width = size[1], size[0]
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    for split, count in (("train", per_class), ("test", test)):
        for k in range(classes if count else 0):
            folder = root / split / f"class_{k}"
            folder.mkdir(parents=True, exist_ok=True)
            angle = torch.tensor(k * math.pi / classes)
            for i in range(count):
                phase = torch.rand(1, generator=generator) * 6.28
                stripes = (torch.sin((x * torch.cos(angle) + y * torch.sin(angle)) * 1.2 + phase) > 0).float()
                colour, paper = torch.rand(3, 1, 1, generator=generator), torch.rand(3, 1, 1, generator=generator)
                image = (
                    stripes * colour + (1 - stripes) * paper + 0.1 * torch.randn(3, height, width, generator=generator)
                )
                pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
                Image.fromarray(pixels, "RGB").convert(mode).save(folder / f"{i:03d}.png")
    return root


@functools.cache
def _composed_train(group: str, name: str) -> DictConfig:
    """train.py's config with `group=name`, composed once a process (composing takes most of a second)."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"{group}={name}"])
