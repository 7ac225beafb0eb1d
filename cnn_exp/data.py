"""MNIST and Fashion-MNIST as one LightningDataModule, held in memory as normalized tensors."""

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler, TensorDataset
from torchvision.datasets import MNIST, FashionMNIST
from torchvision.datasets.utils import extract_archive

from cnn_exp.errors import UserError, is_number, is_whole

log = logging.getLogger(__name__)

# torchvision's classes know each dataset's folder name and files; the two differ in data only.
DATASETS: dict[str, type[MNIST]] = {"MNIST": MNIST, "FashionMNIST": FashionMNIST}


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


def augment(images: torch.Tensor, shift: int, flip: bool, background: float) -> torch.Tensor:
    """Translate each image by its own random whole-pixel offset of up to `shift`, and mirror half of them.

    One `grid_sample` for the whole batch instead of per-image transforms (torchvision's v2 transforms draw one
    set of parameters per call, shared by a batch). Pixels shifted in are `background`.
    """
    n, _, height, width = images.shape
    if shift:
        offsets = torch.randint(-shift, shift + 1, (n, 2), device=images.device).float()
        theta = torch.zeros(n, 2, 3, device=images.device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        # In grid coordinates the image spans [-1, 1]: one pixel is 2 / size; nearest sampling keeps pixels whole.
        theta[:, :, 2] = offsets * 2 / torch.tensor([width, height], device=images.device)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        images = F.grid_sample(images - background, grid, mode="nearest", align_corners=False) + background
    if flip:
        mirrored = torch.rand(n, device=images.device) < 0.5
        images = torch.where(mirrored[:, None, None, None], images.flip(-1), images)
    return images


def _as_batch(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Collate function: `InMemoryDataset.__getitems__` already returns a finished batch."""
    return batch


class MNISTDataModule(L.LightningDataModule):
    """Decodes the IDX files once (with torchvision) into normalized float tensors and serves batches by indexing.

    The validation split is drawn from the training images with a seeded generator; the official test images
    are only ever the test split. With `val_size=0` every training image is trained on, as in the notebook.
    """

    def __init__(
        self,
        dataset: str = "MNIST",
        data_dir: str = "data",
        mirror: str | None = None,
        download: bool = True,
        mean: float = 0.0,
        std: float = 1.0,
        batch_size: int = 100,
        val_size: int = 5000,
        classes: list[str] | None = None,
        seed: int = 0,
        shift: int = 0,
        flip: bool = False,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise UserError(f"data.dataset={dataset!r} is not one of {sorted(DATASETS)}")
        if not is_whole(batch_size) or batch_size <= 0:
            raise UserError(f"data.batch_size={batch_size} must be a positive number of images")
        if not is_whole(val_size) or val_size < 0:
            raise UserError(f"data.val_size={val_size} must be 0 (no validation split) or a positive number of images")
        if not (is_number(mean) and is_number(std)):
            raise UserError(f"data.mean={mean} and data.std={std} must be numbers")
        if std <= 0:
            raise UserError(f"data.std={std} must be positive")
        if not is_whole(shift) or shift < 0:
            raise UserError(f"data.shift={shift} must be 0 (off) or a whole number of pixels")
        if flip and dataset == "MNIST":
            raise UserError("data.flip=true mirrors images, which turns digits into other shapes: FashionMNIST only")
        self.save_hyperparameters()
        self.classes = classes or list(DATASETS[dataset].classes)
        self.train_set: InMemoryDataset | None = None
        self.val_set: InMemoryDataset | None = None
        self.test_set: InMemoryDataset | None = None
        self.sampler: EpochSampler | None = None
        self._resume_from: tuple[int, int] | None = None

    @property
    def raw_dir(self) -> Path:
        return Path(self.hparams.data_dir) / self.hparams.dataset / "raw"

    def prepare_data(self) -> None:
        """Make sure the four IDX files are in `data_dir`: from the mirror, else from torchvision's download."""
        if not self._missing_files():
            return
        dataset, mirror, download_error = self.hparams.dataset, self.hparams.mirror, "off (data.download=false)"
        if mirror:
            self._copy_from_mirror(Path(mirror) / dataset / "raw")
        if self._missing_files() and self.hparams.download:
            try:
                DATASETS[dataset](self.hparams.data_dir, train=False, download=True)
            except Exception as err:  # no network, a proxy, a bad archive: each ends in the message below
                download_error = "failed: " + str(err).strip().splitlines()[-1]
        if missing := self._missing_files():
            raise UserError(
                f"{dataset} files missing from {self.raw_dir}: {', '.join(missing)}\n"
                f"  paths.data_mirror: "
                + (f"{Path(mirror) / dataset / 'raw'} does not hold them (plain or .gz)" if mirror else "not set")
                + f"\n  download: {download_error}\n"
                "Set paths.data_mirror (or the CNN_EXP_DATA_MIRROR variable) to a folder laid out as "
                f"<dir>/{dataset}/raw/*.gz, or paths.data_dir to a folder that already holds the files."
            )

    def setup(self, stage: str) -> None:
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
        return DataLoader(self.train_set, self.hparams.batch_size, sampler=self.sampler, collate_fn=_as_batch)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set) if self.val_set is not None else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def on_after_batch_transfer(self, batch: tuple[torch.Tensor, torch.Tensor], dataloader_idx: int) -> tuple:
        """Augment training batches where they already are (on the GPU with trainer=gpu); never evaluation ones."""
        augmenting = (self.hparams.shift or self.hparams.flip) and self.trainer is not None and self.trainer.training
        # Lightning also passes the model's example input through here (for the layer table and graph): not a batch.
        if augmenting and isinstance(batch, tuple | list) and len(batch) == 2:
            images, labels = batch
            background = -self.hparams.mean / self.hparams.std  # a black pixel, normalized
            batch = (augment(images, self.hparams.shift, self.hparams.flip, background), labels)
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
        return DataLoader(dataset, batch_size=self.hparams.batch_size, collate_fn=_as_batch)

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Read one split with torchvision and normalize it once: N×1×28×28 float images, N int64 labels."""
        files = f"{'train' if train else 't10k'}-images-idx3-ubyte and -labels-idx1-ubyte in {self.raw_dir}"
        redo = "delete them, and the next run copies them again from the mirror or the download."
        try:
            split = DATASETS[self.hparams.dataset](self.hparams.data_dir, train=train)
        except (RuntimeError, AssertionError, ValueError, OSError) as err:
            raise UserError(
                f"cannot read {files}: {str(err).strip() or type(err).__name__}. The files are truncated or damaged: "
                f"{redo}"
            ) from None
        if len(split.data) != len(split.targets):
            raise UserError(f"{files} disagree: {len(split.data)} images but {len(split.targets)} labels: {redo}")
        images = split.data.unsqueeze(1).float().div_(255).sub_(self.hparams.mean).div_(self.hparams.std)
        return images, split.targets

    def _missing_files(self) -> list[str]:
        names = [Path(url).name.removesuffix(".gz") for url, _ in DATASETS[self.hparams.dataset].resources]
        return [name for name in names if not (self.raw_dir / name).is_file()]

    def _copy_from_mirror(self, source: Path) -> None:
        """Copy (or decompress) each missing file from a read-only mirror; a file appears whole or not at all."""
        self.raw_dir.mkdir(parents=True, exist_ok=True)
        for name in self._missing_files():
            with tempfile.TemporaryDirectory(dir=self.raw_dir) as tmp:
                if (source / f"{name}.gz").is_file():
                    extract_archive(source / f"{name}.gz", tmp)
                elif (source / name).is_file():
                    shutil.copyfile(source / name, Path(tmp) / name)
                else:
                    continue
                os.replace(Path(tmp) / name, self.raw_dir / name)
                log.info("copied %s from %s", name, source)
