"""data=folder: a folder of one's own images (generated here), read, split, normalized and checked; trained, stopped
and resumed to the bit, tested, predicted and exported from the checkpoint alone."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnn_exp.errors import UserError
from cnn_exp.folder import FolderDataModule
from tests.conftest import NO_FIGURES, make_image_folder, read_metrics, run


@pytest.fixture(scope="module")
def colour(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("colour"), classes=3, per_class=20, size=(20, 12))


def test_classes_shape_and_splits_come_from_the_folder(colour: Path) -> None:
    data = FolderDataModule(str(colour), val_size=6, test_size=0.25, batch_size=8)
    assert data.classes == ["class_0", "class_1", "class_2"]
    assert data.input_shape == (3, 20, 20)  # colour, the first image's longer side
    data.setup("fit")
    data.setup("test")
    sizes = len(data.train_set), len(data.val_set), len(data.test_set)
    assert sizes == (60 - 15 - 6, 6, 15)
    assert data.train_set.tensors[0].shape[1:] == (3, 20, 20)
    # The test split is the same images for every run seed (normalized by each run's own training images); the
    # validation split follows the seed.
    other = FolderDataModule(str(colour), val_size=6, test_size=0.25, batch_size=8, seed=1)
    other.setup("fit")
    other.setup("test")

    def pixels(data: FolderDataModule, split: torch.Tensor) -> torch.Tensor:
        mean, std = (torch.tensor(data.hparams[key]).view(1, 3, 1, 1) for key in ("mean", "std"))
        return (split * std + mean).mul(255).round()

    assert torch.equal(pixels(other, other.test_set.tensors[0]), pixels(data, data.test_set.tensors[0]))
    assert not torch.equal(pixels(other, other.val_set.tensors[0]), pixels(data, data.val_set.tensors[0]))
    assert not torch.equal(pixels(other, other.test_set.tensors[0]), pixels(data, data.train_set.tensors[0][:15]))


def test_mean_and_std_are_measured_on_the_images_trained_on_and_saved(colour: Path) -> None:
    data = FolderDataModule(str(colour), val_size=6, test_size=0.25)
    assert data.hparams.mean is None
    data.setup("fit")
    # Measured independently: the training images read back as 0-1 values from their normalized form.
    std, mean = torch.tensor(data.hparams.std).view(1, 3, 1, 1), torch.tensor(data.hparams.mean).view(1, 3, 1, 1)
    pixels = data.train_set.tensors[0] * std + mean
    assert torch.allclose(pixels.mean(dim=(0, 2, 3)), mean.flatten(), atol=1e-5)
    assert torch.allclose(pixels.std(dim=(0, 2, 3), unbiased=False), std.flatten(), atol=1e-4)
    assert not torch.allclose(mean, torch.full_like(mean, 0.5), atol=0.01)  # the images' own statistics, measured


def test_grey_images_make_one_channel_and_any_size_is_resized(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path, classes=2, per_class=6, size=(30, 40), mode="L")
    data = FolderDataModule(str(root), image_size=16, val_size=0, test_size=2)
    assert data.input_shape == (1, 16, 16)
    data.setup("fit")
    assert data.train_set.tensors[0].shape == (10, 1, 16, 16)
    image = Image.new("RGBA", (50, 20), (255, 0, 0, 0))  # a transparent colour image for predict=: white, grey, 16×16
    assert torch.equal(data.load_image(image), torch.ones(1, 16, 16))


def _folder(tmp_path: Path, layout: dict[str, int]) -> Path:
    """Folders of `layout` (path: number of images) under tmp_path, each image a small grey square."""
    for folder, count in layout.items():
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / folder / f"{i}.png")
    return tmp_path


@pytest.mark.parametrize(
    ("layout", "settings", "message"),
    [
        ({}, {"root": "missing"}, "no such folder"),
        ({"images/a": 3}, {}, "train is not a folder"),
        ({"train/a": 3, "train/b": 0}, {}, "train/b holds no image"),
        ({"train/a": 3}, {}, "train/ holds one class (a): a classifier needs two or more"),
        ({"train/a": 3, "train/b": 3, "test/a": 1, "test/c": 1}, {}, "test/ has other classes than train/"),
        ({"train/a": 3, "train/b": 3}, {"val_size": 10}, "data.val_size=10 sets aside 10 of the 4 images"),
        ({"train/a": 3, "train/b": 3}, {"test_size": 1.5}, "data.test_size=1.5 must be a share"),
        ({"train/a": 3, "train/b": 3}, {"channels": 2}, "data.channels=2 must be 1 (grey) or 3 (colour)"),
        ({"train/a": 3, "train/b": 3}, {"mean": [0.5], "std": None}, "give both, or neither"),
        ({"train/a": 3, "train/b": 3}, {"test_size": 0}, "no test/ folder and data.test_size=0 leave no test images"),
    ],
)
def test_a_bad_folder_is_one_error_naming_what_to_fix(
    tmp_path: Path, layout: dict[str, int], settings: dict, message: str
) -> None:
    root = _folder(tmp_path, layout)
    settings = {"root": str(root), "test_size": 2, "val_size": 0} | settings
    if settings["root"] == "missing":
        settings["root"] = str(tmp_path / "missing")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        FolderDataModule(**settings)


def test_an_unreadable_image_is_named(tmp_path: Path) -> None:
    root = _folder(tmp_path, {"train/a": 3, "train/b": 3})
    (root / "train" / "b" / "broken.png").write_bytes(b"not an image")
    data = FolderDataModule(str(root), val_size=0, test_size=2)
    with pytest.raises(UserError, match=r"broken\.png: not an image"):
        data.setup("fit")


def test_hidden_folders_and_files_are_not_classes_or_images(tmp_path: Path) -> None:
    root = _folder(tmp_path, {"train/a": 3, "train/b": 3, "train/.ipynb_checkpoints": 1, "train/a/.cache": 2})
    (root / "train" / "a" / ".hidden.png").write_bytes(b"not an image")
    data = FolderDataModule(str(root), val_size=0, test_size=2)
    assert data.classes == ["a", "b"]
    data.setup("fit")
    assert len(data.train_set) == 4


@pytest.mark.slow
def test_a_folder_run_resumes_to_the_bit_and_its_checkpoint_tests_predicts_and_exports(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "images", classes=3, per_class=40, size=(16, 16))
    settings = [f"data.root={root}", "data.batch_size=16", "data.shift=1", "data.flip=true", "data.erase=0.2"]
    settings += [
        "optimizer=adam",
        "trainer.max_epochs=2",
        "callbacks.step_checkpoint.every_n_train_steps=3",
        *NO_FIGURES,
    ]
    run("train.py", "data=folder", *settings, f"hydra.run.dir={tmp_path / 'whole'}")
    whole = read_metrics(tmp_path / "whole")
    stop = [
        "+callbacks.stop._target_=tests.callbacks.SignalAt",
        "+callbacks.stop.step=7",
        "+callbacks.stop.signal=SIGTERM",
    ]
    stopped = run("train.py", "data=folder", *settings, *stop, f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    run("train.py", f"resume={tmp_path / 'run'}")
    resumed = read_metrics(tmp_path / "run")
    assert resumed["status"] == "finished" and resumed["metrics"] == whole["metrics"]

    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    saved = checkpoint["datamodule_hyper_parameters"]
    assert checkpoint["datamodule_target"] == "cnn_exp.folder.FolderDataModule" and len(saved["mean"]) == 3
    run("test.py", f"ckpt_path={last}", f"hydra.run.dir={tmp_path / 'test'}")
    assert read_metrics(tmp_path / "test")["metrics"]["test/acc"] == resumed["metrics"]["test/acc"]
    run("test.py", f"ckpt_path={last}", f"predict={root / 'train' / 'class_1'}", f"hydra.run.dir={tmp_path / 'p'}")
    predicted = (tmp_path / "p" / "predictions.csv").read_text().splitlines()[1:]
    assert len(predicted) == 40 and all(line.split(",")[1].startswith("class_") for line in predicted)
    run("test.py", f"ckpt_path={last}", "export=onnx", f"hydra.run.dir={tmp_path / 'e'}")
    import onnxruntime

    meta = onnxruntime.InferenceSession(str(tmp_path / "e" / "model.onnx")).get_modelmeta().custom_metadata_map
    assert (
        json.loads(meta["classes"]) == ["class_0", "class_1", "class_2"] and json.loads(meta["mean"]) == saved["mean"]
    )
    assert meta["input"].startswith("images: N×3×16×16 float32, RGB")


def test_a_checkpoints_settings_need_no_folder_until_images_are_read_and_refuse_a_changed_one(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "images", classes=3, per_class=6, size=(12, 12))
    data = FolderDataModule(str(root), val_size=0, test_size=3)
    data.setup("fit")
    saved = dict(data.hparams)  # what a checkpoint holds
    assert saved["classes"] == ["class_0", "class_1", "class_2"] and len(saved["listing"]) == 64
    moved = root.rename(tmp_path / "moved")
    rebuilt = FolderDataModule(**saved)  # predict= and export= need nothing more
    assert rebuilt.classes == data.classes and rebuilt.input_shape == (3, 12, 12)
    assert rebuilt.load_image(Image.new("RGB", (30, 30), "white")).shape == (3, 12, 12)
    with pytest.raises(UserError, match="no such folder"):
        rebuilt.setup("test")
    moved.rename(root)
    FolderDataModule(**saved).setup("test")  # as it was: read
    (root / "train" / "class_1" / "000.png").rename(root / "train" / "class_2" / "999.png")
    with pytest.raises(UserError, match="the folder holds other images than this run's data"):
        FolderDataModule(**saved).setup("test")


def test_sixteen_bit_grey_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(3):
            pixels = np.full((8, 8), 20000 + 15000 * i, dtype=np.uint16)
            Image.fromarray(pixels).save(tmp_path / "train" / name / f"{i}.png")  # mode I;16
    data = FolderDataModule(str(tmp_path), val_size=0, test_size=2)
    assert data.input_shape == (1, 8, 8)
    images = torch.cat([data._images("train")[0], data._images("test")[0]])
    assert sorted({int(v) for v in images.unique()}) == [78, 136, 195]  # 20000, 35000, 50000 of 65535, in 255ths
