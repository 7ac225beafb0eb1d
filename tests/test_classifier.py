"""The LightningModule: plain hyperparameters, shapes in the summary, and a training step for any padding."""

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.model_summary import ModelSummary

from cnn_exp.classifier import Classifier
from cnn_exp.data import MNISTDataModule
from tests.conftest import MIRROR, composed

SGD = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}


def net(name: str, **overrides: object) -> dict:
    return composed("model", name, **overrides)


def plain(value: object) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


def test_hyperparameters_are_plain_values() -> None:
    model = Classifier(net=net("net3"), optimizer=SGD, scheduler={})
    assert plain(dict(model.hparams)) and model.hparams.net["channels"] == [6, 12, 24]


def test_the_summary_shows_each_layers_shapes_for_one_image() -> None:
    summary = ModelSummary(Classifier(net=net("net2"), optimizer=SGD), max_depth=2)
    shapes = dict(zip(summary.layer_names, zip(summary.in_sizes, summary.out_sizes, strict=True), strict=True))
    assert shapes["net.conv1"] == ([1, 1, 28, 28], [1, 6, 24, 24])
    assert shapes["net.conv1_pool"] == ([1, 6, 24, 24], [1, 6, 12, 12])
    assert shapes["net.conv2_pool"] == ([1, 12, 8, 8], [1, 12, 4, 4])
    assert shapes["net.flatten"] == ([1, 12, 4, 4], [1, 192])
    assert shapes["net.out"] == ([1, 60], [1, 10])


@pytest.fixture(scope="module")
def mnist(tmp_path_factory: pytest.TempPathFactory) -> MNISTDataModule:
    data = MNISTDataModule("MNIST", str(tmp_path_factory.mktemp("data")), str(MIRROR), batch_size=50, val_size=100)
    data.prepare_data()
    return data


@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("name", ["net2", "net3"])
def test_any_padding_trains(mnist: MNISTDataModule, name: str, padding: int, tmp_path: Path) -> None:
    model = Classifier(net=net(name, padding=padding), optimizer=SGD)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = L.Trainer(
        fast_dev_run=3, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path
    )
    trainer.fit(model, datamodule=mnist)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert 0 <= trainer.callback_metrics["val/acc"] <= 1
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
