"""MNIST and Fashion-MNIST as one LightningDataModule, held in memory as normalized tensors."""

import gzip
import hashlib
import json
import logging
import math
import os
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import lightning as L
import torch
import torch.nn.functional as F
from filelock import FileLock, Timeout
from omegaconf import ListConfig
from torch.utils.data import DataLoader, Sampler, TensorDataset
from torchvision.datasets import MNIST, FashionMNIST
from torchvision.datasets.mnist import read_label_file

from cnn_exp import atomic
from cnn_exp.errors import UserError, is_number, is_whole

log = logging.getLogger(__name__)

# torchvision's classes know each dataset's folder name, files and class names; the two differ in data only.
DATASETS: dict[str, type[MNIST]] = {"MNIST": MNIST, "FashionMNIST": FashionMNIST}
# Each dataset's pixel mean and standard deviation over its 60,000 training images (0 to 1): what data.mean and
# data.std are unless a config sets them (the notebook's recipes train on unnormalized images: 0 and 1).
STATISTICS = {"MNIST": (0.1307, 0.3081), "FashionMNIST": (0.2860, 0.3530)}
# Both datasets' images are 28×28 and grey; their splits' files start with these names and, in the official files,
# hold this many images.
IMAGE_SIZE = 28
SPLITS = {"train": 60_000, "t10k": 10_000}
# The MD5s of the decompressed official files, as published with the datasets (and listed in
# ../shared/datasets/README.md). Kept here as data: what a file must be is never read from a file.
OFFICIAL_MD5 = {
    "6bbc9ace898e44ae57da46a324031adb": ("MNIST", "train-images-idx3-ubyte"),
    "a25bea736e30d166cdddb491f175f624": ("MNIST", "train-labels-idx1-ubyte"),
    "2646ac647ad5339dbf082846283269ea": ("MNIST", "t10k-images-idx3-ubyte"),
    "27ae3e4e09519cfbb04c329615203637": ("MNIST", "t10k-labels-idx1-ubyte"),
    "f4a8712d7a061bf5bd6d2ca38dc4d50a": ("FashionMNIST", "train-images-idx3-ubyte"),
    "9018921c3c673c538a1fc5bad174d6f9": ("FashionMNIST", "train-labels-idx1-ubyte"),
    "8181f5470baa50b63fa0f6fddb340f0a": ("FashionMNIST", "t10k-images-idx3-ubyte"),
    "15d484375f8d13e6eb1aabb0c3f46965": ("FashionMNIST", "t10k-labels-idx1-ubyte"),
}
# Beside the files in data_dir: the MD5 each file had when it was checked, with the size, times and inode it had
# then, so that an unchanged file is not read again on every run. It can spare a check, nothing more.
CHECKED = ".checked.json"
# Taken while data_dir is filled: runs started together wait for one another instead of copying over each other.
LOCK = ".fill.lock"
CHUNK = 1 << 20
# The longest class name accepted (data.classes): a label in plots and tables, and a TensorBoard tag.
MAX_NAME = 100


def split_files(split: str) -> tuple[str, str]:
    """The images file and the labels file of a split ("train" or "t10k")."""
    return f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"


def idx_size(name: str, head: bytes) -> int | None:
    """The size in bytes that the header `head` of the IDX file `name` announces; None if `head` is too short to
    hold a header. For a header that idx_problem accepts: header, then one byte per pixel or label."""
    header = 16 if "images" in name else 8
    if len(head) < header:
        return None
    return header + int.from_bytes(head[4:8], "big") * (IMAGE_SIZE * IMAGE_SIZE if header == 16 else 1)


def idx_problem(name: str, head: bytes, size: int) -> str | None:
    """What is wrong with the IDX file `name` of `size` bytes that starts with `head`; None if its header fits.

    We read the 16-byte headers ourselves only to check them early: torchvision decodes a split when it is loaded,
    so a bad test file would otherwise be found at the final test, after all the training.
    """
    dims = 3 if "images" in name else 1
    what = "images" if dims == 3 else "labels"
    header = 4 + 4 * dims
    if size == 0:
        return "is empty (0 bytes)"
    if len(head) < header:
        return f"is too short to be an IDX file ({size} bytes)"
    magic, count, *shape = struct.unpack(f">{1 + dims}I", head[:header])
    if magic != 0x800 + dims:  # unsigned bytes (0x08) in `dims` dimensions
        return f"is not an IDX file of {what} (it starts with {magic:#010x}, not {0x800 + dims:#010x})"
    if shape and shape != [IMAGE_SIZE, IMAGE_SIZE]:
        return f"holds {shape[0]}×{shape[1]} images, not the datasets' {IMAGE_SIZE}×{IMAGE_SIZE}"
    if count == 0:
        return f"holds no {what}"
    expected = idx_size(name, head)
    if size < expected:
        return f"is truncated: its header announces {count} {what} ({expected} bytes) but it has {size} bytes"
    if size > expected:
        return f"has {size - expected} bytes more than the {count} {what} its header announces"
    return None


def _stamp(stat: os.stat_result) -> list[int]:
    """What changes whenever a file is written or replaced: an unchanged stamp means unchanged contents."""
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def _open(source: Path, origin: str, fix: str) -> IO[bytes]:
    """A mirror's or download's file, decompressed as it is read if it ends in .gz."""
    try:
        return gzip.open(source) if source.suffix == ".gz" else open(source, "rb")
    except OSError as err:
        raise UserError(f"cannot read {origin}: {err}: {fix}") from None


def _read(source: IO[bytes], origin: str, fix: str, size: int = CHUNK) -> bytes:
    """The next `size` bytes of a mirror's or download's file (fewer at its end); a damaged one becomes a UserError
    naming it."""
    try:
        return source.read(size)
    except (OSError, EOFError, zlib.error) as err:  # a truncated or corrupt .gz, an unreadable file
        raise UserError(f"cannot read {origin}: {err}: {fix}") from None


def _check_classes(classes: object, dataset: str) -> None:
    """Refuse class names that are not one short string per class of `dataset`.

    They may come from a checkpoint (datamodule_hyper_parameters.classes), so the length is checked before any
    name is looked at: ten million names are refused at once, not after minutes of logging and plotting them.
    """
    count = len(DATASETS[dataset].classes)
    if not isinstance(classes, list | tuple | ListConfig):  # a config's list, when instantiated without _convert_
        raise UserError(f"data.classes must be a list of {count} class names, not {type(classes).__name__}")
    if len(classes) != count:
        raise UserError(
            f"data.classes names {len(classes)} classes, but {dataset} has {count}: give {count} names, or leave "
            "data.classes out for the dataset's own"
        )
    for i, name in enumerate(classes):
        if not isinstance(name, str):
            raise UserError(f"data.classes[{i}]: a class name must be a string, not {type(name).__name__}")
        if len(name) > MAX_NAME:
            raise UserError(f"data.classes[{i}] has {len(name)} characters; a class name has at most {MAX_NAME}")


class InMemoryDataset(TensorDataset):
    """A TensorDataset that hands the DataLoader a whole batch from one indexing operation.

    Its tensors may live on the GPU: then only the batch's indices (a few hundred bytes, from pinned memory,
    without waiting) travel to it each step, and the images are gathered there.
    """

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices)
        if self.tensors[0].is_cuda:
            index = index.pin_memory().to(self.tensors[0].device, non_blocking=True)
        return tuple(tensor.index_select(0, index) for tensor in self.tensors)


class EpochSampler(Sampler[int]):
    """Shuffles with a generator seeded by (seed, epoch), so each epoch's order depends on those two alone.

    A run resumed from a checkpoint therefore sees the batches an uninterrupted run would; `resume_from` makes
    it skip the part of an epoch it had already trained on. Lightning calls `set_epoch` before every epoch.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0
        self.resume_from: tuple[int, int] | None = None  # (epoch, images of it already trained on)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 10_000 + self.epoch))
        if self.resume_from is not None and self.resume_from[0] == self.epoch:
            order = order[self.resume_from[1] :]
        self.resume_from = None
        return iter(order.tolist())


def augment(images: torch.Tensor, shift: int, flip: bool, background: float, erase: float = 0.0) -> torch.Tensor:
    """Translate each image by its own random whole-pixel offset of up to `shift`, mirror half of them, and erase
    a random rectangle from each with probability `erase`.

    One `grid_sample` and one mask for the whole batch instead of per-image transforms (torchvision's v2 transforms
    draw one set of parameters per call, shared by a batch). Pixels shifted in and erased are `background`.
    """
    n, _, height, width = images.shape
    if shift:
        images = translate(images, torch.randint(-shift, shift + 1, (n, 2), device=images.device), background)
    if flip:
        mirrored = torch.rand(n, device=images.device) < 0.5
        images = torch.where(mirrored[:, None, None, None], images.flip(-1), images)
    if erase:
        images = torch.where(_erased(n, height, width, erase, images.device)[:, None], background, images)
    return images


def translate(images: torch.Tensor, offsets: torch.Tensor, background: float) -> torch.Tensor:
    """Each image (n, c, h, w) read `offsets[i]` = (dx, dy) whole pixels away: output pixel (y, x) is input pixel
    (y + dy, x + dx), and one that falls outside is `background`. One `grid_sample` for the whole batch.
    """
    n, _, height, width = images.shape
    theta = torch.zeros(n, 2, 3, device=images.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    # In grid coordinates the image spans [-1, 1]: one pixel is 2 / size; nearest sampling keeps pixels whole.
    theta[:, :, 2] = offsets.float() * 2 / torch.tensor([width, height], device=images.device)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images - background, grid, mode="nearest", align_corners=False) + background


def _erased(n: int, height: int, width: int, probability: float, device: torch.device) -> torch.Tensor:
    """Masks (n, height, width) of one rectangle per image, with probability `probability` (else empty).

    Drawn as torchvision's RandomErasing draws them, per image: 2-33 % of the area, aspect ratio 0.3-3.3.
    """
    area = torch.empty(n, device=device).uniform_(0.02, 0.33) * height * width
    ratio = torch.empty(n, device=device).uniform_(math.log(0.3), math.log(1 / 0.3)).exp()
    rows = (area * ratio).sqrt().round().clamp(1, height)
    cols = (area / ratio).sqrt().round().clamp(1, width)
    top = (torch.rand(n, device=device) * (height - rows + 1)).floor()
    left = (torch.rand(n, device=device) * (width - cols + 1)).floor()
    y = torch.arange(height, device=device)[None, :, None]
    x = torch.arange(width, device=device)[None, None, :]
    inside_rows = (y >= top[:, None, None]) & (y < (top + rows)[:, None, None])
    inside_cols = (x >= left[:, None, None]) & (x < (left + cols)[:, None, None])
    chosen = torch.rand(n, device=device) < probability
    return inside_rows & inside_cols & chosen[:, None, None]


def _own() -> torch.Generator:
    """A generator for a DataLoader's worker seed, which it would otherwise draw from torch's global one each time
    it starts an epoch: dropout and augmentation draw from that one, and a resumed run must see the same numbers."""
    return torch.Generator()


def _as_batch(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Collate function: `InMemoryDataset.__getitems__` already returns a finished batch."""
    return batch


class MNISTDataModule(L.LightningDataModule):
    """Decodes the IDX files once (with torchvision) into normalized float tensors and serves batches by indexing.

    The validation split is drawn from the training images with a seeded generator; the official test images
    are only ever the test split. With `val_size=0` every training image is trained on, as in the notebook.
    `verify=false` skips the MD5 check of the files (their headers are always checked).
    """

    def __init__(
        self,
        dataset: str = "MNIST",
        data_dir: str = "data",
        mirror: str | None = None,
        download: bool = True,
        mean: float | None = None,
        std: float | None = None,
        batch_size: int = 100,
        val_size: int = 5000,
        classes: list[str] | None = None,
        seed: int = 0,
        shift: int = 0,
        flip: bool = False,
        erase: float = 0.0,
        verify: bool = True,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise UserError(f"data.dataset={dataset!r} is not one of {sorted(DATASETS)}")
        # Resolved before the settings are saved: a checkpoint holds the numbers it was trained with.
        mean = STATISTICS[dataset][0] if mean is None else mean
        std = STATISTICS[dataset][1] if std is None else std
        if not is_whole(batch_size) or batch_size <= 0:
            raise UserError(f"data.batch_size={batch_size} must be a positive number of images")
        if not is_whole(val_size) or val_size < 0:
            raise UserError(f"data.val_size={val_size} must be 0 (no validation split) or a positive number of images")
        if not (is_number(mean) and is_number(std)):
            raise UserError(f"data.mean={mean} and data.std={std} must be numbers")
        # nan or inf would make every image nan, reported only later as a training that diverged.
        if not math.isfinite(mean):
            raise UserError(f"data.mean={mean} must be a finite number")
        if not math.isfinite(std) or std <= 0:
            raise UserError(f"data.std={std} must be a finite number above 0")
        if not is_whole(shift) or shift < 0:
            raise UserError(f"data.shift={shift} must be 0 (off) or a whole number of pixels")
        if flip and dataset == "MNIST":
            raise UserError("data.flip=true mirrors images, which turns digits into other shapes: FashionMNIST only")
        if not is_number(erase) or not 0 <= erase <= 1:
            raise UserError(f"data.erase={erase} must be a probability from 0 (off) to 1")
        if not isinstance(verify, bool):
            raise UserError(f"data.verify={verify} must be true or false")
        if classes is not None:
            _check_classes(classes, dataset)
        classes = list(classes) if classes is not None else list(DATASETS[dataset].classes)
        self.save_hyperparameters()
        self.classes = classes
        self.train_set: InMemoryDataset | None = None
        self.val_set: InMemoryDataset | None = None
        self.test_set: InMemoryDataset | None = None
        self.sampler: EpochSampler | None = None
        self._resume_from: tuple[int, int] | None = None

    @property
    def raw_dir(self) -> Path:
        return Path(self.hparams.data_dir) / self.hparams.dataset / "raw"

    def prepare_data(self) -> None:
        """Make sure data_dir holds the four IDX files, and that they are what their names say, before any training.

        Missing files come from the mirror, else from torchvision's download. Then every file's header is checked,
        and (data.verify) its MD5 against the official files': another dataset's or split's file is refused by
        name; a file with an unknown MD5 is accepted as a subset of one's own, with a warning, unless it holds as
        many images as the official file (then it is a damaged copy or another dataset).
        """
        if self._missing_files():
            self._fill()
        counts = self._check_headers()
        if self.hparams.verify:
            self._check_checksums(counts)

    def setup(self, stage: str) -> None:
        # A network built for other images would fail at its first batch, deep inside; say so before any training.
        shape = getattr(getattr(self.trainer and self.trainer.lightning_module, "net", None), "input_shape", None)
        if shape is not None and tuple(shape) != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise UserError(
                f"the network takes {'×'.join(map(str, shape))} images (model.in_channels, model.image_size), "
                f"but {self.hparams.dataset}'s are 1×{IMAGE_SIZE}×{IMAGE_SIZE}: set model.image_size={IMAGE_SIZE} "
                "and model.in_channels=1"
            )
        # The images go once to the device the Trainer trains on (the GPU with trainer=gpu), not batch by batch.
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        if stage in ("fit", "validate") and self.train_set is None:
            images, labels = (tensor.to(device) for tensor in self._load(train=True))
            val_size = self.hparams.val_size
            if val_size >= len(labels):
                raise UserError(f"data.val_size={val_size} leaves no training images (the set has {len(labels)})")
            generator = torch.Generator().manual_seed(self.hparams.seed)
            order = torch.randperm(len(labels), generator=generator).to(device)
            val, train = order[:val_size], order[val_size:]
            self.train_set = InMemoryDataset(images[train], labels[train])
            if val_size:
                self.val_set = InMemoryDataset(images[val], labels[val])
        if stage in ("test", "predict") and self.test_set is None:
            self.test_set = InMemoryDataset(*(tensor.to(device) for tensor in self._load(train=False)))

    def train_dataloader(self) -> DataLoader:
        self.sampler = EpochSampler(len(self.train_set), self.hparams.seed)
        if self._resume_from and self.trainer and self.trainer.world_size > 1:
            # Lightning shards the sampler's full order across ranks, so it cannot skip a part of it.
            log.warning("resuming under DDP restarts the interrupted epoch's data order from its beginning")
            self._resume_from = None
        self.sampler.resume_from, self._resume_from = self._resume_from, None
        return DataLoader(
            self.train_set, self.hparams.batch_size, sampler=self.sampler, collate_fn=_as_batch, generator=_own()
        )

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set) if self.val_set is not None else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def on_after_batch_transfer(self, batch: tuple[torch.Tensor, torch.Tensor], dataloader_idx: int) -> tuple:
        """Augment training batches where they already are (on the GPU with trainer=gpu); never evaluation ones."""
        data = self.hparams
        augmenting = (data.shift or data.flip or data.erase) and self.trainer is not None and self.trainer.training
        # Lightning also passes the model's example input through here (for the layer table and graph): not a batch.
        if augmenting and isinstance(batch, tuple | list) and len(batch) == 2:
            images, labels = batch
            background = -data.mean / data.std  # a black pixel, normalized
            batch = (augment(images, data.shift, data.flip, background, data.erase), labels)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the dataset, the epoch in progress and how many of its batches were trained on."""
        batches = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"dataset": self.hparams.dataset, "epoch": self.sampler.epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["dataset"] != self.hparams.dataset:
            raise UserError(
                f"the checkpoint was trained on {state['dataset']}, this run asks for {self.hparams.dataset} "
                "(data=...): resume with the data it was trained on"
            )
        self._resume_from = (state["epoch"], state["batches"] * self.hparams.batch_size)

    def _loader(self, dataset: InMemoryDataset) -> DataLoader:
        # No worker processes: batches are slices of tensors already in memory, workers would only add copies.
        return DataLoader(dataset, batch_size=self.hparams.batch_size, collate_fn=_as_batch, generator=_own())

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Read one split with torchvision and normalize it once: N×1×28×28 float images, N int64 labels."""
        files = f"{'train' if train else 't10k'}-images-idx3-ubyte and -labels-idx1-ubyte in {self.raw_dir}"
        try:
            split = DATASETS[self.hparams.dataset](self.hparams.data_dir, train=train)
        except (RuntimeError, AssertionError, ValueError, OSError) as err:  # changed since prepare_data checked them
            raise UserError(
                f"cannot read {files}: {str(err).strip() or type(err).__name__}. The files are truncated or damaged: "
                "delete them, and the next run copies them again from the mirror or the download."
            ) from None
        images = split.data.unsqueeze(1).float().div_(255).sub_(self.hparams.mean).div_(self.hparams.std)
        return images, split.targets

    def _missing_files(self) -> list[str]:
        return [name for split in SPLITS for name in split_files(split) if not (self.raw_dir / name).is_file()]

    def _fill(self) -> None:
        """Copy the missing files from the mirror, else download them; one run at a time fills a data_dir."""
        dataset, mirror, download_error = self.hparams.dataset, self.hparams.mirror, "off (data.download=false)"
        try:
            self.raw_dir.mkdir(parents=True, exist_ok=True)
            lock = FileLock(self.raw_dir / LOCK)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                log.info("waiting for another run that is filling %s", self.raw_dir)
                lock.acquire()
        except OSError as err:
            raise UserError(f"cannot write to paths.data_dir={self.hparams.data_dir}: {err}") from None
        try:
            # Left by a run killed while copying. Under the lock no other run is copying, so none is in use.
            for name in self._missing_files():
                for stale in self.raw_dir.glob(f".{name}.*.tmp"):
                    stale.unlink(missing_ok=True)
            if mirror and self._missing_files():  # another run may have filled it while this one waited
                self._copy_all(Path(mirror) / dataset / "raw", "the mirror's", "fix or replace it in the mirror")
            if self._missing_files() and self.hparams.download:
                with tempfile.TemporaryDirectory(dir=self.hparams.data_dir) as tmp:
                    try:
                        DATASETS[dataset](tmp, train=False, download=True)
                    except Exception as err:  # no network, a proxy, a bad archive: each ends in the message below
                        download_error = "failed: " + str(err).strip().splitlines()[-1]
                    else:
                        self._copy_all(Path(tmp) / dataset / "raw", "the downloaded", "try again later")
        finally:
            lock.release()
        if missing := self._missing_files():
            raise UserError(
                f"{dataset} files missing from {self.raw_dir}: {', '.join(missing)}; "
                f"paths.data_mirror: "
                + (f"{Path(mirror) / dataset / 'raw'} does not hold them (plain or .gz)" if mirror else "not set")
                + f"; download: {download_error}. "
                "Set paths.data_mirror (or the CNN_EXP_DATA_MIRROR variable) to a folder laid out as "
                f"<dir>/{dataset}/raw/*.gz, or paths.data_dir to a folder that already holds the files."
            )

    def _copy_all(self, source_dir: Path, origin: str, fix: str) -> None:
        """Copy (or decompress) each missing file from `source_dir`, checked on the way, and remember their MD5s."""
        for name in self._missing_files():
            for source in (source_dir / f"{name}.gz", source_dir / name):
                if source.is_file():
                    self._remember({name: self._copy(source, name, f"{origin} {source}", fix)})
                    log.info("copied %s from %s", name, source)
                    break

    def _copy(self, source: Path, name: str, origin: str, fix: str) -> dict[str, Any]:
        """Stream one file into data_dir, computing its MD5; it appears there whole and checked, or not at all.

        The header is read and checked first, and nothing past the size it announces is ever written: a .gz of a
        few hundred KB may decompress to gigabytes (damaged, or made to fill the disk), and is refused one chunk
        past that size, naming the file, instead of filling data_dir's disk and blaming its free space.
        """
        target, digest = self.raw_dir / name, hashlib.md5()
        try:
            with atomic.replace(target, "wb") as out, _open(source, origin, fix) as opened:
                head = _read(opened, origin, fix, 16)  # all of it if shorter: read() stops early only at the end
                announced = idx_size(name, head)
                # The header alone, as if the file had the size it announces (a head too short for one is all of it).
                if problem := idx_problem(name, head, announced or len(head)):
                    raise UserError(f"{origin} {problem}: {fix}")
                chunk, size = head, 0
                while chunk:
                    size += len(chunk)
                    if size > announced:  # stop reading: the rest may be gigabytes
                        raise UserError(f"{origin} is longer than the {announced} bytes its header announces: {fix}")
                    digest.update(chunk)
                    out.write(chunk)
                    chunk = _read(opened, origin, fix)
                problem = idx_problem(name, head, size)
                if not problem and self.hparams.verify:
                    problem = self._identity_problem(name, digest.hexdigest(), int.from_bytes(head[4:8], "big"))
                if problem:  # raised inside: atomic.replace then leaves nothing in data_dir
                    raise UserError(f"{origin} {problem}: {fix}")
        except OSError as err:  # writing: a full disk, a file-size limit, a read-only data_dir
            raise UserError(
                f"cannot write {target}: {err.strerror or err}: free space or choose another paths.data_dir"
            ) from None
        return {"stamp": _stamp(target.stat()), "md5": digest.hexdigest()}

    def _check_headers(self) -> dict[str, int]:
        """Both splits' headers, image and label counts and label values, before training: {split: images}."""
        counts, redo = {}, "delete it, and the next run copies it again from the mirror or the download"
        for split in SPLITS:
            for name in split_files(split):
                path = self.raw_dir / name
                try:
                    with open(path, "rb") as f:
                        head, size = f.read(16), os.fstat(f.fileno()).st_size
                except OSError as err:  # another user's file without read permission, a directory by that name
                    raise UserError(f"cannot read {path}: {err.strerror or err}") from None
                if problem := idx_problem(name, head, size):
                    raise UserError(f"{path} {problem}: {redo}")
                counts.setdefault(split, []).append(int.from_bytes(head[4:8], "big"))
            images, labels = counts[split]
            if images != labels:
                raise UserError(
                    f"{split}-images-idx3-ubyte and -labels-idx1-ubyte in {self.raw_dir} disagree: {images} images "
                    f"but {labels} labels: delete them, and the next run copies them again from the mirror or the "
                    "download (if they disagree there too, its copies are damaged)"
                )
            # A label past the last class would stop training at its first batch with a traceback (60 KB to read).
            path = self.raw_dir / split_files(split)[1]
            if (top := int(read_label_file(str(path)).max())) >= len(self.classes):
                raise UserError(f"{path} holds label {top}, but data.classes names {len(self.classes)} classes: {redo}")
        return {split: images for split, (images, _) in counts.items()}

    def _check_checksums(self, counts: dict[str, int]) -> None:
        """Each file's MD5, computed once per version of the file: refuse the wrong files, warn of unknown ones."""
        checked, fresh, unknown, problems = self._checked(), {}, [], []
        for split, count in counts.items():
            for name in split_files(split):
                path = self.raw_dir / name
                entry = checked.get(name)
                if entry is None or entry["stamp"] != _stamp(path.stat()):
                    with open(path, "rb") as f:
                        digest = hashlib.file_digest(f, "md5")
                        entry = fresh[name] = {"stamp": _stamp(os.fstat(f.fileno())), "md5": digest.hexdigest()}
                if problem := self._identity_problem(name, entry["md5"], count):
                    problems.append(f"{path} {problem}")
                elif entry["md5"] not in OFFICIAL_MD5:
                    unknown.append(name)
        self._remember(fresh)
        if problems:
            more = f" (and {len(problems) - 1} more of its files)" if len(problems) > 1 else ""
            raise UserError(
                f"{problems[0]}{more}: delete the wrong files in {self.raw_dir}, and the next run copies "
                f"{self.hparams.dataset}'s again from the mirror or the download"
            )
        if unknown:
            log.warning(
                "%s: %d of the %s files are not the official ones (unknown MD5); used as a subset of %d training and "
                "%d test images",
                self.raw_dir, len(unknown), self.hparams.dataset, counts["train"], counts["t10k"],
            )  # fmt: skip

    def _identity_problem(self, name: str, md5: str, count: int) -> str | None:
        """What is wrong with a file of `count` images or labels by its MD5: another official file's, or a damaged
        copy of a full split. None: the official file, or a subset (unknown MD5, fewer images)."""
        dataset = self.hparams.dataset
        official = OFFICIAL_MD5.get(md5)
        if official:
            return None if official == (dataset, name) else f"is {official[0]}'s {official[1]}, not {dataset}'s {name}"
        if count == SPLITS[name.split("-")[0]]:
            return (
                f"has as many entries ({count}) as {dataset}'s official {name} but another MD5 ({md5}): "
                "a damaged copy, or another dataset (data.verify=false takes it as it is)"
            )
        return None

    def _checked(self) -> dict[str, dict[str, Any]]:
        """The MD5s remembered beside the files; entries of any other shape are ignored (then checked again)."""
        try:
            record = json.loads((self.raw_dir / CHECKED).read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(record, dict):
            return {}
        return {
            name: entry
            for name, entry in record.items()
            if isinstance(entry, dict)
            and set(entry) == {"stamp", "md5"}
            and isinstance(entry["md5"], str)
            and isinstance(entry["stamp"], list)
        }

    def _remember(self, fresh: dict[str, dict[str, Any]]) -> None:
        """Add newly computed MD5s to the record beside the files; a read-only data_dir keeps none (checks again)."""
        if fresh:
            try:
                atomic.write_text(self.raw_dir / CHECKED, json.dumps(self._checked() | fresh, indent=1) + "\n")
            except OSError as err:
                log.debug("cannot remember the checked MD5s in %s: %s", self.raw_dir, err)
