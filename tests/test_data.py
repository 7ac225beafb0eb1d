"""The DataModule: files from a mirror, a seeded split of the training images, tensors equal to the notebook's."""

import hashlib
import shutil
import socket
from pathlib import Path

import pytest
import torch
from torchvision import transforms
from torchvision.datasets import MNIST, FashionMNIST

from cnn_exp.data import MNISTDataModule, augment
from cnn_exp.errors import UserError
from tests.conftest import MIRROR

FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def images(dataset: torch.utils.data.TensorDataset) -> set[bytes]:
    return {image.numpy().tobytes() for image in dataset.tensors[0]}


def test_prepare_fills_data_dir_from_a_gz_mirror_and_never_writes_to_it(tmp_path: Path) -> None:
    before = fingerprint(MIRROR)
    for name in ("MNIST", "FashionMNIST"):
        MNISTDataModule(name, data_dir=str(tmp_path), mirror=str(MIRROR), download=False).prepare_data()
        raw = tmp_path / name / "raw"
        assert sorted(p.name for p in raw.iterdir()) == sorted(FILES)
        # IDX headers plus 28x28 bytes per image, one byte per label.
        sizes = {f: (raw / f).stat().st_size for f in FILES}
        assert sizes == {FILES[0]: 16 + 1000 * 784, FILES[1]: 8 + 1000, FILES[2]: 16 + 200 * 784, FILES[3]: 8 + 200}
    assert fingerprint(MIRROR) == before


def test_a_mirror_of_decompressed_files_works_too(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    MNISTDataModule("MNIST", data_dir=str(plain), mirror=str(MIRROR), download=False).prepare_data()
    data = MNISTDataModule("MNIST", data_dir=str(tmp_path / "data"), mirror=str(plain), download=False)
    data.prepare_data()
    assert fingerprint(tmp_path / "data") == fingerprint(plain)


def test_missing_files_without_mirror_or_network_give_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    data = MNISTDataModule("FashionMNIST", data_dir=str(tmp_path), mirror=None, download=True)
    with pytest.raises(UserError) as err:
        data.prepare_data()
    message = str(err.value)
    assert f"FashionMNIST files missing from {tmp_path / 'FashionMNIST' / 'raw'}" in message
    assert all(name in message for name in FILES)
    assert "paths.data_mirror: not set" in message and "download: failed" in message
    assert "Name or service not known" in message and "paths.data_dir" in message


def test_a_mirror_without_the_files_is_named_in_the_error(tmp_path: Path) -> None:
    data = MNISTDataModule("MNIST", data_dir=str(tmp_path / "data"), mirror=str(tmp_path), download=False)
    with pytest.raises(UserError, match=r"paths.data_mirror: .*MNIST/raw does not hold them"):
        data.prepare_data()


@pytest.fixture
def fashion(data_dir: Path) -> MNISTDataModule:
    data = MNISTDataModule(
        "FashionMNIST", data_dir=str(data_dir), mirror=str(MIRROR), mean=0.2860, std=0.3530, batch_size=64, val_size=200
    )
    data.prepare_data()
    return data


def test_tensors_equal_the_notebooks_totensor_normalize_pipeline(fashion: MNISTDataModule, data_dir: Path) -> None:
    fashion.setup("test")
    notebook = FashionMNIST(
        data_dir,
        train=False,
        transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize(0.2860, 0.3530)]),
    )
    images, labels = fashion.test_set.tensors
    assert images.shape == (200, 1, 28, 28) and images.dtype == torch.float32 and labels.dtype == torch.int64
    for i in (0, 57, 199):
        assert torch.allclose(images[i], notebook[i][0], atol=1e-6)
        assert labels[i] == notebook[i][1]


def test_the_validation_split_is_seeded_disjoint_and_from_the_training_images(
    fashion: MNISTDataModule, data_dir: Path
) -> None:
    fashion.setup("fit")
    fashion.setup("test")
    train, val = images(fashion.train_set), images(fashion.val_set)
    assert (len(fashion.train_set), len(fashion.val_set), len(fashion.test_set)) == (800, 200, 200)
    assert not train & val
    assert not (train | val) & images(fashion.test_set)

    def split(val_size: int, seed: int) -> MNISTDataModule:
        data = MNISTDataModule("FashionMNIST", str(data_dir), mean=0.2860, std=0.3530, val_size=val_size, seed=seed)
        data.setup("fit")
        return data

    assert train | val == images(split(0, seed=0).train_set)
    assert images(split(200, seed=0).val_set) == val
    assert images(split(200, seed=1).val_set) != val


def test_loaders_serve_every_image_once_per_epoch_in_batches(fashion: MNISTDataModule) -> None:
    fashion.setup("fit")
    batches = list(fashion.train_dataloader())
    assert [len(labels) for _, labels in batches] == [64] * 12 + [32]
    assert all(images.shape[1:] == (1, 28, 28) for images, _ in batches)
    served = {image.numpy().tobytes() for batch, _ in batches for image in batch}
    assert served == images(fashion.train_set)
    assert sum(len(labels) for _, labels in fashion.val_dataloader()) == 200


def test_val_size_zero_trains_on_every_training_image(data_dir: Path) -> None:
    data = MNISTDataModule("MNIST", data_dir=str(data_dir), mirror=str(MIRROR), val_size=0)
    data.prepare_data()
    data.setup("fit")
    assert len(data.train_set) == len(MNIST(data_dir, train=True)) == 1000
    assert data.val_set is None and data.val_dataloader() == []


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"batch_size": 0}, "data.batch_size=0 must be a positive"),
        ({"val_size": -1}, "data.val_size=-1 must be 0"),
        ({"dataset": "CIFAR10"}, "data.dataset='CIFAR10' is not one of"),
        ({"shift": -1}, "data.shift=-1 must be 0"),
        ({"dataset": "MNIST", "flip": True}, "data.flip=true mirrors images, which turns digits into other shapes"),
    ],
)
def test_bad_settings_are_refused_when_built(setting: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        MNISTDataModule(**setting)


def test_a_validation_split_as_large_as_the_training_set_is_refused(data_dir: Path) -> None:
    data = MNISTDataModule("MNIST", data_dir=str(data_dir), mirror=str(MIRROR), val_size=1000)
    data.prepare_data()
    with pytest.raises(UserError, match=r"data.val_size=1000 leaves no training images \(the set has 1000\)"):
        data.setup("fit")


def test_copying_from_the_mirror_leaves_no_partial_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A failure mid-copy (disk full, a kill) must not leave a file under its real name for the next run to trust.
    def broken(src: Path, dst: Path) -> None:
        Path(dst).write_bytes(b"half")
        raise OSError("disk full")

    plain = tmp_path / "plain"
    MNISTDataModule("MNIST", data_dir=str(plain), mirror=str(MIRROR), download=False).prepare_data()
    monkeypatch.setattr(shutil, "copyfile", broken)
    with pytest.raises(OSError, match="disk full"):
        MNISTDataModule("MNIST", data_dir=str(tmp_path / "data"), mirror=str(plain), download=False).prepare_data()
    assert list((tmp_path / "data" / "MNIST" / "raw").iterdir()) == []


def test_augmentation_moves_whole_images_and_only_training_batches(fashion: MNISTDataModule) -> None:
    fashion.setup("fit")
    images, labels = fashion.train_set[list(range(64))]
    background = -fashion.hparams.mean / fashion.hparams.std
    torch.manual_seed(0)
    shifted = augment(images, shift=2, flip=False, background=background)
    for before, after in zip(images, shifted, strict=True):
        # Each image moved by whole pixels (at most 2 each way) with background shifted in: one of 25 offsets fits.
        padded = torch.nn.functional.pad(before, (2, 2, 2, 2), value=background)
        assert any(torch.allclose(padded[:, 2 + dy : 30 + dy, 2 + dx : 30 + dx], after, atol=1e-6)
                   for dy in range(-2, 3) for dx in range(-2, 3))  # fmt: skip
    assert not torch.equal(shifted, images)  # and most of them did move

    flipped = augment(images, shift=0, flip=True, background=background)
    mirrored = [torch.equal(a, b.flip(-1)) and not torch.equal(a, b) for a, b in zip(flipped, images, strict=True)]
    assert 16 < sum(mirrored) < 48 and all(
        m or torch.equal(a, b) for m, a, b in zip(mirrored, flipped, images, strict=True)
    )

    class Loop:  # what the hook reads of the Trainer
        training = False

    data = MNISTDataModule("FashionMNIST", shift=2, flip=True)
    data.trainer = Loop()
    assert data.on_after_batch_transfer((images, labels), 0)[0] is images  # validation and test: untouched
    Loop.training = True
    assert not torch.equal(data.on_after_batch_transfer((images, labels), 0)[0], images)
