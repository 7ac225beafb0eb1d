"""Shared fixtures: the small real datasets in tests/data, and train.py / test.py run the way a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The first 1,000 training and 200 test images of each dataset, written by tests/make_data.py.
MIRROR = ROOT / "tests" / "data"
# Small and quick: 800 training and 200 validation images.
QUICK = ["data.val_size=200", "trainer.max_epochs=1"]


def run(script: str, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run an entry script from the project root, as the README does, without the user's data-mirror variable."""
    env = {key: value for key, value in os.environ.items() if key != "CNN_EXP_DATA_MIRROR"}
    proc = subprocess.run(
        [sys.executable, script, *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode:
        raise AssertionError(
            f"{script} {' '.join(overrides)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


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


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data directory for the session: the first run fills it from tests/data, later runs find it full."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def paths(tmp_path: Path, data_dir: Path) -> list[str]:
    """Overrides that keep a run's data and outputs inside pytest's temporary folders."""
    return [f"paths.data_dir={data_dir}", f"paths.data_mirror={MIRROR}", f"paths.log_dir={tmp_path / 'outputs'}"]


# The `trained` run: Network2 on the MNIST subset, 3 epochs, with a validation split.
TRAINED = ["data.val_size=200", "trainer.max_epochs=3", "trainer.log_every_n_steps=4", "seed=7"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """One finished `train.py` run, shared by the tests that inspect a run's outputs."""
    run_dir = tmp_path_factory.mktemp("trained")
    run("train.py", f"paths.data_dir={data_dir}", f"paths.data_mirror={MIRROR}", f"hydra.run.dir={run_dir}", *TRAINED)
    return run_dir
