"""The DataModule: files from a mirror, a seeded split of the training images, tensors equal to the notebook's."""

import gzip
import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import socket
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from filelock import FileLock
from torchvision import transforms
from torchvision.datasets import MNIST, FashionMNIST

from cnn_exp import datafiles as data_module
from cnn_exp.data import MNISTDataModule, augment
from cnn_exp.datafiles import CHECKED, LOCK
from cnn_exp.errors import UserError
from cnn_exp.net import ConvNet
from tests.conftest import MIRROR, QUICK, ROOT, read_metrics, run, run_here, start
from tests.forkserver import Process
from tests.make_data import IMAGES_MAGIC, LABELS_MAGIC, write_idx

FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".")  # the data files, not the MD5 record or the lock
    }


def images(dataset: torch.utils.data.TensorDataset) -> set[bytes]:
    return {image.numpy().tobytes() for image in dataset.tensors[0]}


def test_prepare_fills_data_dir_from_a_gz_mirror_and_never_writes_to_it(tmp_path: Path) -> None:
    before = fingerprint(MIRROR)
    for name in ("MNIST", "FashionMNIST"):
        MNISTDataModule(name, data_dir=str(tmp_path), mirror=str(MIRROR), download=False).prepare_data()
        raw = tmp_path / name / "raw"
        # The four files, the MD5s checked and the fill lock: no temporary file left.
        assert sorted(p.name for p in raw.iterdir()) == sorted([*FILES, CHECKED, LOCK])
        # IDX headers plus 28x28 bytes per image, one byte per label.
        sizes = {f: (raw / f).stat().st_size for f in FILES}
        assert sizes == {FILES[0]: 16 + 1000 * 784, FILES[1]: 8 + 1000, FILES[2]: 16 + 200 * 784, FILES[3]: 8 + 200}
        # Readable as a plain copy would be (by the group, in a shared data_dir), not its owner's alone.
        umask = os.umask(0o022)
        os.umask(umask)
        assert {(raw / f).stat().st_mode & 0o777 for f in FILES} == {0o666 & ~umask}
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
        ({"erase": 1.5}, "data.erase=1.5 must be a probability"),
        # Not numbers to normalize by: every image would become nan, reported later as a diverged training.
        ({"mean": float("nan")}, "data.mean=nan must be a finite number"),
        ({"mean": float("-inf")}, "data.mean=-inf must be a finite number"),
        ({"std": float("nan")}, "data.std=nan must be a finite number above 0"),
        ({"std": float("inf")}, "data.std=inf must be a finite number above 0"),
        ({"std": 0.0}, "data.std=0.0 must be a finite number above 0"),
        ({"std": -0.3}, "data.std=-0.3 must be a finite number above 0"),
    ],
)
def test_bad_settings_are_refused_when_built(setting: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        MNISTDataModule(**setting)


def test_a_mean_of_nan_on_the_command_line_stops_train_py_before_training(tmp_path: Path) -> None:
    # Hydra reads `nan` as the float: refused with the setting's name, not as "training diverged" after an epoch.
    with pytest.raises(SystemExit, match=r"^error: data\.mean=nan must be a finite number$"):
        run_here("train.py", tmp_path / "run", "data.mean=nan", f"paths.data_dir={tmp_path / 'data'}")
    assert not (tmp_path / "data").exists()


def test_ten_million_class_names_from_a_checkpoint_are_refused_at_once() -> None:
    # datamodule_hyper_parameters.classes of a checkpoint: 142 s, then a traceback. Refused by its length alone.
    names = ["x"] * 10**7
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"^data\.classes names 10000000 classes, but MNIST has 10: give 10 names"):
        MNISTDataModule("MNIST", classes=names)
    assert time.perf_counter() - start < 0.1


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        (["zero", "one"], r"data\.classes names 2 classes, but MNIST has 10: give 10 names"),
        ("0123456789", r"data\.classes must be a list of 10 class names, not str"),
        ([str(i) for i in range(9)] + [9], r"data\.classes\[9\]: a class name must be a string, not int"),
        (
            [str(i) for i in range(9)] + ["9" * 101],
            r"data\.classes\[9\] has 101 characters; a class name has at most 100",
        ),
    ],
    ids=["two", "a-string", "a-number", "a-long-name"],
)
def test_class_names_of_the_wrong_count_or_kind_are_refused(classes: object, message: str) -> None:
    with pytest.raises(UserError, match=message):
        MNISTDataModule("MNIST", classes=classes)


def test_class_names_of_ones_own_are_kept() -> None:
    names = [f"digit {i}" for i in range(10)]
    assert MNISTDataModule("MNIST", classes=names).classes == names
    assert MNISTDataModule("FashionMNIST").classes == list(FashionMNIST.classes)


def test_a_validation_split_as_large_as_the_training_set_is_refused(data_dir: Path) -> None:
    data = MNISTDataModule("MNIST", data_dir=str(data_dir), mirror=str(MIRROR), val_size=1000)
    data.prepare_data()
    with pytest.raises(UserError, match=r"data.val_size=1000 leaves no training images \(the set has 1000\)"):
        data.setup("fit")


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


def test_random_erasing_blanks_one_rectangle_in_the_images_it_chooses(fashion: MNISTDataModule) -> None:
    fashion.setup("fit")
    images, _ = fashion.train_set[list(range(64))]
    background = -fashion.hparams.mean / fashion.hparams.std
    torch.manual_seed(0)
    assert torch.equal(augment(images, shift=0, flip=False, background=background, erase=0.0), images)
    erased = augment(images, shift=0, flip=False, background=background, erase=1.0)
    changed = 0
    for before, after in zip(images[:, 0], erased[:, 0], strict=True):
        rows, cols = (after != before).nonzero(as_tuple=True)
        if not len(rows):  # the rectangle fell on background only
            continue
        changed += 1
        box = after[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        # What changed lies in one rectangle of background, of at most a third of the image (rounding: 36 %).
        assert torch.all(box == background) and box.numel() <= 0.36 * 28 * 28
        outside = torch.ones_like(after, dtype=torch.bool)
        outside[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = False
        assert torch.equal(after[outside], before[outside])
    assert changed >= 48
    # With probability one half, about half of the images lose a rectangle.
    half = augment(images, shift=0, flip=False, background=background, erase=0.5)
    assert 12 < sum(not torch.equal(a, b) for a, b in zip(half, images, strict=True)) < 44


# ---- Files that are not what their names say: found before training, refused with one line, never half-copied.

# The full datasets, where this machine has them (../shared/datasets from the project root).
SHARED = ROOT.parent / "shared" / "datasets"


def idx(kind: str, count: int, size: int = 28, value: int = 0) -> bytes:
    """An IDX file of `count` blank images of size×size pixels, or of `count` labels, all `value`."""
    if kind == "images":
        return struct.pack(">4I", IMAGES_MAGIC, count, size, size) + bytes([value]) * (count * size * size)
    return struct.pack(">2I", LABELS_MAGIC, count) + bytes([value]) * count


def plain(tmp_path: Path, dataset: str) -> Path:
    """A folder of the user's own: the subset's four decompressed files, put there without this project."""
    raw = tmp_path / "own" / dataset / "raw"
    with_us = tmp_path / "filled"
    MNISTDataModule(dataset, data_dir=str(with_us), mirror=str(MIRROR), download=False).prepare_data()
    raw.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(with_us / dataset / "raw" / name, raw / name)
    return raw


def own(raw: Path, **settings: object) -> MNISTDataModule:
    """The DataModule of a data_dir that `raw` is the folder of, without a mirror or download to fill it."""
    return MNISTDataModule(raw.parent.name, data_dir=str(raw.parents[1]), mirror=None, download=False, **settings)


@pytest.fixture
def as_official(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' subsets stand in for the official files: their MD5s and image counts are the known ones.

    The check is driven by that table alone; test_the_table_knows_the_real_files checks the table itself.
    """
    known = {}
    for dataset in ("MNIST", "FashionMNIST"):
        for name in FILES:
            known[hashlib.md5((plain(tmp_path / "ref", dataset) / name).read_bytes()).hexdigest()] = (dataset, name)
    monkeypatch.setattr(data_module, "OFFICIAL_MD5", known)
    monkeypatch.setattr(data_module, "SPLITS", {"train": 1000, "t10k": 200})


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("train-images-idx3-ubyte", b"", "train-images-idx3-ubyte is empty (0 bytes)"),
        ("t10k-labels-idx1-ubyte", b"\0\0\x08", "t10k-labels-idx1-ubyte is too short to be an IDX file (3 bytes)"),
        (
            "t10k-images-idx3-ubyte",
            idx("images", 200)[:-1000],
            "t10k-images-idx3-ubyte is truncated: its header announces 200 images (156816 bytes) but it has 155816",
        ),
        ("t10k-images-idx3-ubyte", idx("images", 200, size=32), "t10k-images-idx3-ubyte holds 32×32 images, not"),
        ("t10k-labels-idx1-ubyte", idx("labels", 200) + b"\0", "has 1 bytes more than the 200 labels its header"),
        ("train-images-idx3-ubyte", idx("labels", 1000), "is not an IDX file of images (it starts with 0x00000801"),
        ("t10k-labels-idx1-ubyte", idx("labels", 199), "t10k-images-idx3-ubyte and -labels-idx1-ubyte in"),
        ("t10k-labels-idx1-ubyte", idx("labels", 200, value=12), "holds label 12, but data.classes names 10 classes"),
        ("t10k-images-idx3-ubyte", idx("images", 0), "t10k-images-idx3-ubyte holds no images"),
    ],
    ids=["empty", "short", "truncated", "32x32", "longer", "labels-as-images", "miscounted", "label-12", "no-images"],
)
def test_a_bad_file_in_data_dir_is_named_before_training(
    name: str, content: bytes, message: str, tmp_path: Path
) -> None:
    # The test split's files too: a bad one was found only at the final test, after all the training.
    raw = plain(tmp_path, "MNIST")
    (raw / name).write_bytes(content)
    with pytest.raises(UserError) as err:
        own(raw).prepare_data()
    assert message in str(err.value) and str(raw) in str(err.value)
    assert "delete" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "train-images-idx3-ubyte.gz is empty (0 bytes)"),
        (b"not gzip at all", "train-images-idx3-ubyte.gz: Not a gzipped file"),
        ("half", "train-images-idx3-ubyte.gz: Compressed file ended before the end-of-stream marker"),
        ("32x32", "train-images-idx3-ubyte.gz holds 32×32 images, not the datasets' 28×28"),
    ],
    ids=["empty", "not-gzip", "half", "32x32"],
)
def test_a_bad_file_in_the_mirror_is_named_and_never_copied(content: bytes | str, message: str, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    shutil.copytree(MIRROR / "MNIST", mirror / "MNIST")
    bad = mirror / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    if content == "half":  # a download or copy of the archive cut off
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    elif content == "32x32":
        write_idx(bad, IMAGES_MAGIC, torch.zeros(1000, 32, 32))
    else:
        bad.write_bytes(content)
    data = MNISTDataModule("MNIST", data_dir=str(tmp_path / "data"), mirror=str(mirror), download=False)
    with pytest.raises(UserError) as err:
        data.prepare_data()
    assert f"the mirror's {bad}" in str(err.value) and message in str(err.value)
    assert "fix or replace it in the mirror" in str(err.value)
    # Neither under its name nor half-written beside it.
    assert not [p.name for p in data.raw_dir.iterdir() if p.name.startswith((".train-images", "train-images"))]


def test_another_datasets_files_in_data_dir_are_refused_by_name(tmp_path: Path, as_official: None) -> None:
    # The user's own folder, never copied by us: MNIST's files where FashionMNIST's belong.
    raw = tmp_path / "own" / "FashionMNIST" / "raw"
    shutil.copytree(plain(tmp_path, "MNIST"), raw)
    with pytest.raises(UserError) as err:
        own(raw).prepare_data()
    assert str(err.value) == (
        f"{raw / FILES[0]} is MNIST's train-images-idx3-ubyte, not FashionMNIST's train-images-idx3-ubyte "
        f"(and 3 more of its files): delete the wrong files in {raw}, and the next run copies FashionMNIST's again "
        "from the mirror or the download"
    )


def test_another_splits_file_is_refused_by_name(tmp_path: Path, as_official: None) -> None:
    raw = plain(tmp_path, "MNIST")
    shutil.copyfile(raw / "train-labels-idx1-ubyte", raw / "t10k-labels-idx1-ubyte")
    shutil.copyfile(raw / "train-images-idx3-ubyte", raw / "t10k-images-idx3-ubyte")
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte is MNIST's train-images-idx3-ubyte, not MNIST's t10k"):
        own(raw).prepare_data()


def test_a_mirror_with_another_datasets_files_is_refused_before_copying(tmp_path: Path, as_official: None) -> None:
    mirror = tmp_path / "mirror"
    shutil.copytree(MIRROR / "MNIST", mirror / "FashionMNIST")
    data = MNISTDataModule("FashionMNIST", data_dir=str(tmp_path / "data"), mirror=str(mirror), download=False)
    with pytest.raises(UserError) as err:
        data.prepare_data()
    assert str(err.value) == (
        f"the mirror's {mirror / 'FashionMNIST' / 'raw' / 'train-images-idx3-ubyte.gz'} is MNIST's "
        "train-images-idx3-ubyte, not FashionMNIST's train-images-idx3-ubyte: fix or replace it in the mirror"
    )
    assert sorted(p.name for p in data.raw_dir.iterdir()) == [LOCK]


def test_a_damaged_full_copy_is_refused_and_verify_false_takes_it(tmp_path: Path, as_official: None) -> None:
    # As many images as the official file, one pixel changed: not a subset, a damaged copy (or another dataset).
    raw = plain(tmp_path, "MNIST")
    content = bytearray((raw / "train-images-idx3-ubyte").read_bytes())
    content[1000] ^= 0xFF
    (raw / "train-images-idx3-ubyte").write_bytes(content)
    with pytest.raises(UserError) as err:
        own(raw).prepare_data()
    assert "has as many entries (1000) as MNIST's official train-images-idx3-ubyte but another MD5" in str(err.value)
    assert "a damaged copy, or another dataset (data.verify=false takes it as it is)" in str(err.value)
    own(raw, verify=False).prepare_data()  # the user's word that it is meant to be so


def test_a_subset_of_ones_own_is_used_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    raw = plain(tmp_path, "FashionMNIST")  # the tests' subsets: their MD5s are not the official ones
    caplog.clear()
    with caplog.at_level(logging.WARNING, "cnn_exp.datafiles"):
        own(raw).prepare_data()
    assert [r.getMessage() for r in caplog.records] == [
        f"{raw}: 4 of the FashionMNIST files are not the official ones (unknown MD5); "
        "used as a subset of 1000 training and 200 test images"
    ]


def test_each_file_is_hashed_once_and_again_when_replaced_even_with_size_and_time_kept(
    tmp_path: Path, as_official: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed = []
    file_digest = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda f, *a: hashed.append(Path(f.name).name) or file_digest(f, *a))
    raw = plain(tmp_path, "FashionMNIST")
    own(raw).prepare_data()
    assert sorted(hashed) == sorted(FILES)
    hashed.clear()
    own(raw).prepare_data()
    assert hashed == []  # remembered in .checked.json
    # Swapped for MNIST's, as `cp -p` would: same size (the datasets' files have equal sizes) and same mtime.
    target, before = raw / "train-images-idx3-ubyte", (raw / "train-images-idx3-ubyte").stat()
    shutil.copyfile(plain(tmp_path / "m", "MNIST") / "train-images-idx3-ubyte", tmp_path / "swap")
    os.replace(tmp_path / "swap", target)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert target.stat().st_size == before.st_size
    with pytest.raises(UserError, match="train-images-idx3-ubyte is MNIST's train-images-idx3-ubyte"):
        own(raw).prepare_data()
    assert hashed == ["train-images-idx3-ubyte"]


@pytest.mark.parametrize("record", ["not json", "[1, 2]", '{"train-images-idx3-ubyte": {"md5": 5}}', "forged"])
def test_the_md5_record_cannot_vouch_for_a_file_it_did_not_see(tmp_path: Path, as_official: None, record: str) -> None:
    raw = tmp_path / "own" / "FashionMNIST" / "raw"
    shutil.copytree(plain(tmp_path, "MNIST"), raw)
    if record == "forged":  # right MD5s, but for files of other sizes and times than these
        fashion = plain(tmp_path / "f", "FashionMNIST")
        entries = {
            n: {"stamp": [1, 2, 3, 4], "md5": hashlib.md5((fashion / n).read_bytes()).hexdigest()} for n in FILES
        }
        record = json.dumps(entries)
    (raw / CHECKED).write_text(record)
    with pytest.raises(UserError, match="is MNIST's train-images-idx3-ubyte, not FashionMNIST's"):
        own(raw).prepare_data()


def test_a_write_failing_mid_copy_leaves_no_partial_file(tmp_path: Path) -> None:
    # A real failed write: a file-size limit stops the copy of the 784,016-byte images file, as a full disk would.
    data = MNISTDataModule("MNIST", data_dir=str(tmp_path / "data"), mirror=str(MIRROR), download=False)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (500_000, hard))
    try:
        with pytest.raises(UserError, match=r"cannot write .*train-images-idx3-ubyte: File too large: free space"):
            data.prepare_data()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert sorted(p.name for p in data.raw_dir.iterdir()) == [LOCK]
    data.prepare_data()  # the next run fills it
    assert fingerprint(data.raw_dir) == fingerprint(plain(tmp_path, "MNIST"))


def bomb(path: Path, images: int, zeros: int) -> None:
    """A real .gz of a valid header announcing `images` 28×28 images, then `zeros` MiB of zeros: a few hundred KB
    that decompress to hundreds of MB. Written as gzip members (as `cat a.gz b.gz` makes), one compressed MiB of
    zeros repeated, so that making it takes milliseconds; `gzip -d` and Python read them as one stream."""
    member = gzip.compress(bytes(data_module.CHUNK), mtime=0)
    with open(path, "wb") as out:
        out.write(gzip.compress(struct.pack(">4I", IMAGES_MAGIC, images, 28, 28), mtime=0))
        for _ in range(zeros):
            out.write(member)


def test_a_mirror_file_longer_than_its_header_is_refused_after_writing_no_more_than_announced(tmp_path: Path) -> None:
    # 300 KB that decompress to 300 MB behind a header announcing 1,000 images (784,016 bytes). It was copied in
    # full, then refused; on a smaller disk the copy failed first and the error blamed free space.
    mirror = tmp_path / "mirror"
    shutil.copytree(MIRROR / "MNIST", mirror / "MNIST")
    bad = mirror / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    bomb(bad, images=1000, zeros=300)
    assert bad.stat().st_size < 500_000
    announced = 16 + 1000 * 28 * 28
    data = MNISTDataModule("MNIST", data_dir=str(tmp_path / "data"), mirror=str(mirror), download=False)
    # A real limit on what this process may write to a file: one byte past the announced size fails the write.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (announced, hard))
    try:
        with pytest.raises(UserError) as err:
            data.prepare_data()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert str(err.value) == (
        f"the mirror's {bad} is longer than the {announced} bytes its header announces: fix or replace it in the mirror"
    )
    assert sorted(p.name for p in data.raw_dir.iterdir()) == [LOCK]  # no file, no temporary copy left


def test_a_network_for_other_images_is_refused_before_training(data_dir: Path) -> None:
    data = MNISTDataModule("MNIST", data_dir=str(data_dir), mirror=str(MIRROR))
    data.trainer = SimpleNamespace(lightning_module=SimpleNamespace(net=ConvNet(image_size=32)))
    with pytest.raises(UserError, match=r"the network takes 1×32×32 images .* but the data's are 1×28×28"):
        data.setup("fit")


@pytest.mark.skipif(not SHARED.is_dir(), reason="the full datasets are not on this machine")
@pytest.mark.slow
def test_the_table_knows_the_real_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Both full datasets copied and checked without a warning; MNIST's real files under FashionMNIST refused.
    with caplog.at_level(logging.WARNING, "cnn_exp.datafiles"):
        for dataset in ("MNIST", "FashionMNIST"):
            MNISTDataModule(dataset, data_dir=str(tmp_path), mirror=str(SHARED), download=False).prepare_data()
    assert caplog.records == []
    shutil.copytree(tmp_path / "MNIST", tmp_path / "swapped" / "FashionMNIST", ignore=shutil.ignore_patterns(".*"))
    with pytest.raises(UserError, match="is MNIST's train-images-idx3-ubyte, not FashionMNIST's"):
        own(tmp_path / "swapped" / "FashionMNIST" / "raw").prepare_data()


# ---- Real second processes: runs filling one data_dir together, a run killed mid-copy, a bad test split end to end.

FILL = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from cnn_exp.data import MNISTDataModule
MNISTDataModule("MNIST", data_dir=sys.argv[1], mirror=sys.argv[2], download=False).prepare_data()
print("filled")
"""


def python(code: str, *args: object) -> Process:
    """`python -c code args...`, a process of its own (tests/forkserver.py); its output in proc.stdout_path."""
    return start("python", *map(str, args), code=code)


def wait_for(path: Path, line: str, proc: Process) -> None:
    """Wait until `line` appears in the log file `path` (or fail if its process ended without it)."""
    deadline = time.monotonic() + 300
    while line not in path.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, path.read_text()
        time.sleep(0.05)


@pytest.mark.slow
def test_two_runs_filling_one_fresh_data_dir_both_succeed(tmp_path: Path) -> None:
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    # Held here until both runs are waiting for it: then they start filling at the same moment.
    with FileLock(raw / LOCK):
        runs = [python(FILL, tmp_path / "data", MIRROR) for _ in range(2)]
        for proc in runs:
            wait_for(proc.stderr_path, f"waiting for another run that is filling {raw}", proc)
    assert [proc.wait(timeout=300) for proc in runs] == [0, 0]
    texts = [proc.stderr_path.read_text() + proc.stdout_path.read_text() for proc in runs]
    assert all("filled" in text for text in texts)
    # One run copied the four files; the other, waiting for it, found them there and copied none.
    assert sorted(text.count("copied ") for text in texts) == [0, 4]
    assert fingerprint(raw) == fingerprint(plain(tmp_path, "MNIST"))
    assert sorted(p.name for p in raw.iterdir()) == sorted([*FILES, CHECKED, LOCK])


KILLED_MID_COPY = """
import sys, time
import cnn_exp.data as data
import cnn_exp.datafiles as datafiles
read = datafiles._read
def read_then_pause(*args):
    chunk = read(*args)
    if not chunk:  # the whole file is written, not yet renamed to its name
        print("paused", flush=True)
        time.sleep(600)
    return chunk
datafiles._read = read_then_pause
data.MNISTDataModule("MNIST", data_dir=sys.argv[1], mirror=sys.argv[2], download=False).prepare_data()
"""


@pytest.mark.slow
def test_a_run_killed_mid_copy_leaves_no_file_and_the_next_run_fills_it(tmp_path: Path) -> None:
    proc = python(KILLED_MID_COPY, tmp_path / "data", MIRROR)
    wait_for(proc.stdout_path, "paused\n", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    raw = tmp_path / "data" / "MNIST" / "raw"
    left = {p.name for p in raw.iterdir()} - {LOCK}
    assert len(left) == 1 and left.pop().startswith(".train-images-idx3-ubyte.")  # only the temporary copy
    data = MNISTDataModule("MNIST", data_dir=str(tmp_path / "data"), mirror=str(MIRROR), download=False)
    data.prepare_data()
    assert sorted(p.name for p in raw.iterdir()) == sorted([*FILES, CHECKED, LOCK])
    assert fingerprint(raw) == fingerprint(plain(tmp_path, "MNIST"))


@pytest.mark.slow
def test_a_test_split_of_other_images_stops_train_py_before_training(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    shutil.copytree(MIRROR / "MNIST", mirror / "MNIST")
    write_idx(mirror / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz", IMAGES_MAGIC, torch.zeros(200, 32, 32))
    run_dir = tmp_path / "run"
    paths = [f"paths.data_dir={tmp_path / 'data'}", f"paths.data_mirror={mirror}", f"hydra.run.dir={run_dir}"]
    proc = run("train.py", *paths, *QUICK, check=False)
    message = f"error: the mirror's {mirror / 'MNIST' / 'raw' / 't10k-images-idx3-ubyte.gz'} holds 32×32 images"
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr
    result = read_metrics(run_dir)
    assert result["status"] == "failed" and result["steps"] == 0 and "32×32" in result["error"]
