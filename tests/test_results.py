"""A finished run's numbers are real: finite, from finite weights, measured on the data the network was trained for."""

import json
from pathlib import Path

import pytest
import torch

from cnn_exp import checkpoints
from tests.conftest import QUICK, read_metrics, run, run_here


def test_a_last_step_that_blows_the_weights_up_fails_the_run_with_valid_json(paths: list[str], tmp_path: Path) -> None:
    blow_up = ["+callbacks.blow._target_=tests.callbacks.BlowUpWeights"]
    with pytest.raises(SystemExit, match=r"^error: training diverged: the network.s weights are not"):
        run_here("train.py", tmp_path, *paths, *QUICK, *blow_up)
    result = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=lambda token: 1 / 0)  # no NaN tokens
    assert result["status"] == "failed" and "metrics" not in result


def test_max_epochs_0_is_refused_before_it_reports_an_untrained_score(paths: list[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"^error: trainer\.max_epochs=0 must be a whole number of at least 1"):
        run_here("train.py", tmp_path, *paths, "trainer.max_epochs=0")
    assert not (tmp_path / "metrics.json").exists()


def test_test_py_refuses_non_finite_weights_and_a_checkpoint_without_its_data(trained: Path, tmp_path: Path) -> None:
    checkpoint = checkpoints.load(trained / "checkpoints" / "last.ckpt")
    poisoned = dict(checkpoint, state_dict=dict(checkpoint["state_dict"]))
    name = next(key for key in poisoned["state_dict"] if key.endswith("weight"))
    poisoned["state_dict"][name] = torch.full_like(poisoned["state_dict"][name], float("nan"))
    torch.save(poisoned, tmp_path / "nan.ckpt")
    proc = run("test.py", f"ckpt_path={tmp_path / 'nan.ckpt'}", check=False)
    assert proc.returncode == 1 and "holds weights that are not finite numbers" in proc.stderr
    dataless = {key: value for key, value in checkpoint.items() if key != "datamodule_hyper_parameters"}
    torch.save(dataless, tmp_path / "dataless.ckpt")
    proc = run("test.py", f"ckpt_path={tmp_path / 'dataless.ckpt'}", check=False)
    assert proc.returncode == 1 and "does not say which data it was trained on" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert read_metrics(trained)["status"] == "finished"
