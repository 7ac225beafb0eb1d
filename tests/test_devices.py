"""The GPU options on the CPU: bf16 mixed precision, channels-last, torch.compile, and data placed on the device;
on a machine with a GPU, the data kept there and a run on it."""

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

from cnn_exp.classifier import Classifier
from cnn_exp.data import MNISTDataModule
from cnn_exp.precision import auto_precision
from tests.conftest import MIRROR, QUICK, ROOT, read_metrics, run
from tests.test_classifier import SGD, net


@pytest.fixture(scope="module")
def mnist(tmp_path_factory: pytest.TempPathFactory) -> MNISTDataModule:
    data = MNISTDataModule("MNIST", str(tmp_path_factory.mktemp("data")), str(MIRROR), batch_size=50, val_size=100)
    data.prepare_data()
    return data


def test_channels_last_changes_the_layout_not_the_results() -> None:
    plain = Classifier(net=net("net3", channels_last=False), optimizer=SGD)
    nhwc = Classifier(net=net("net3", channels_last=True), optimizer=SGD)
    nhwc.load_state_dict(plain.state_dict())
    assert nhwc.net.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.net.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(8, 1, 28, 28)
    torch.testing.assert_close(nhwc(images), plain(images), rtol=1e-4, atol=1e-5)


def test_bf16_mixed_precision_trains_on_the_cpu(mnist: MNISTDataModule, tmp_path: Path) -> None:
    model = Classifier(net=net("net2"), optimizer=SGD)
    trainer = L.Trainer(
        fast_dev_run=2,
        precision="bf16-mixed",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=mnist)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert model.net.conv1.weight.dtype == torch.float32  # mixed: the weights stay fp32


@pytest.mark.parametrize(
    ("accelerator", "gpu", "cpu", "expected"),
    [
        ("auto", False, {"avx512_bf16": True}, "bf16-mixed"),
        ("cpu", False, {"amx_bf16": True}, "bf16-mixed"),
        ("auto", False, {"avx512_f": True}, "32-true"),  # bf16 emulated there: slower than fp32
        ("cpu", True, {"avx512_bf16": True}, "bf16-mixed"),  # the CPU asked for, beside a GPU
        ("auto", True, {"avx512_bf16": True}, "32-true"),  # the GPU is used: fp32, measured faster there
        ("gpu", True, {"avx512_bf16": True}, "32-true"),
        ("mps", False, {"avx512_bf16": True}, "32-true"),
    ],
)
def test_auto_precision_takes_bf16_only_on_a_cpu_that_computes_it(
    monkeypatch: pytest.MonkeyPatch, accelerator: str, gpu: bool, cpu: dict, expected: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: cpu)
    assert auto_precision(accelerator) == expected


def test_the_recipes_chosen_in_bf16_take_it_where_the_machine_computes_it(tmp_path: Path) -> None:
    def composed(*overrides: str) -> str:
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            return compose("train", overrides=[f"paths.output_dir={tmp_path}", *overrides]).trainer.precision

    assert composed() == composed("experiment=seed_fashion") == composed("experiment=mnist_small") == "32-true"
    assert composed("experiment=fashion_small") == composed("experiment=fashion_best") == auto_precision("auto")
    assert composed("experiment=fashion_best", "trainer=cpu") == auto_precision("cpu")
    assert composed("experiment=fashion_best", "trainer.precision=32-true") == "32-true"


@pytest.mark.slow
def test_compile_builds_and_trains_a_step(mnist: MNISTDataModule, tmp_path: Path) -> None:
    model = Classifier(net=net("net2", compile=True), optimizer=SGD)
    assert model.hparams.net["compile"] is True and model._train_forward == model.forward
    trainer = L.Trainer(
        fast_dev_run=1, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path
    )
    trainer.fit(model, datamodule=mnist)
    assert model._train_forward != model.forward  # compiled when training started
    assert [name for name, _ in model.net.named_parameters()][:2] == ["conv1.weight", "conv1.bias"]
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_the_data_goes_once_to_the_device_the_trainer_trains_on(tmp_path: Path) -> None:
    # No GPU here: the meta device stands in for one; setup must place every split where the strategy says.
    data = MNISTDataModule("MNIST", str(tmp_path), str(MIRROR), val_size=100)
    data.prepare_data()
    data.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("meta")), lightning_module=None)
    data.setup("fit")
    data.setup("test")
    for split in (data.train_set, data.val_set, data.test_set):
        assert all(tensor.device.type == "meta" for tensor in split.tensors)
    assert data.train_set.tensors[0].shape == (900, 1, 28, 28)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_data_stays_there_and_a_run_finishes(paths: list[str], tmp_path: Path) -> None:
    data = MNISTDataModule("MNIST", str(tmp_path / "data"), str(MIRROR), batch_size=50, val_size=100)
    trainer = L.Trainer(accelerator="gpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(Classifier(net=net("net2"), optimizer=SGD), datamodule=data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    for split in (data.train_set, data.val_set):
        assert all(tensor.is_cuda for tensor in split.tensors)
    # A batch is gathered where the images are (InMemoryDataset.__getitems__): only its indices travel.
    indices = [0, 7, 899]
    images, labels = data.train_set.__getitems__(indices)
    assert images.is_cuda and labels.is_cuda
    assert torch.equal(images, data.train_set.tensors[0][indices])
    assert torch.equal(labels, data.train_set.tensors[1][indices])
    images, labels = next(iter(data.train_dataloader()))
    assert images.is_cuda and images.shape == (50, 1, 28, 28) and labels.is_cuda

    run("train.py", *paths, *QUICK, "trainer=gpu", f"hydra.run.dir={tmp_path / 'run'}")
    result = read_metrics(tmp_path / "run")
    assert result["status"] == "finished" and result["epochs"] == 1 and "test/acc" in result["metrics"]
