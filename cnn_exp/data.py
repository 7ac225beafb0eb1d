"""Images held in memory as normalized tensors and served by indexing (InMemoryDataModule), and MNIST and
Fashion-MNIST as one such DataModule; their files are cnn_exp/datafiles.py's, a folder of images cnn_exp/folder.py's.

What train.py, test.py, predict= and export= ask of any DataModule, a user's own included, is in
docs/extend.md#your-data (checked by cnn_exp.build.check_datamodule)."""

import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import ListConfig
from PIL import Image
from torch.utils.data import DataLoader, Sampler, TensorDataset

from cnn_exp.datafiles import DATASETS, IMAGE_SIZE, RawFiles
from cnn_exp.errors import UserError, is_number, is_whole
from cnn_exp.images import frame

log = logging.getLogger(__name__)

# Each dataset's pixel mean and standard deviation over its 60,000 training images (0 to 1): what data.mean and
# data.std are unless a config sets them (the notebook's recipes train on unnormalized images: 0 and 1).
STATISTICS = {"MNIST": (0.1307, 0.3081), "FashionMNIST": (0.2860, 0.3530)}
# Each dataset's class names, in label order, unless data.classes names them: the digits, and Fashion-MNIST's own.
CLASSES = {"MNIST": [str(digit) for digit in range(10)], "FashionMNIST": list(DATASETS["FashionMNIST"].classes)}
# The longest class name accepted (data.classes): a label in plots and tables, and a TensorBoard tag.
MAX_NAME = 100


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
        if not name.strip():
            raise UserError(f"data.classes[{i}] is empty: every class needs a name")
    if len(set(classes)) < len(classes):  # tables and pictures name classes: two of one name would read as one
        repeated = sorted({name for name in classes if list(classes).count(name) > 1})
        raise UserError(
            f"data.classes names {', '.join(map(repr, repeated))} more than once: give each class its own name"
        )


class InMemoryDataset(TensorDataset):
    """A TensorDataset that hands the DataLoader a whole batch from one indexing operation.

    Its tensors may live on the GPU: then only the batch's indices (a few hundred bytes, from pinned memory,
    without waiting) travel to it each step, and the images are gathered there. `mirrored` (one bool per image, or
    None) serves those images mirrored: alternating flips (data.flip=alternate) set it each epoch.
    """

    mirrored: torch.Tensor | None = None

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices)
        if self.tensors[0].is_cuda:
            index = index.pin_memory().to(self.tensors[0].device, non_blocking=True)
        images, *rest = (tensor.index_select(0, index) for tensor in self.tensors)
        if self.mirrored is not None:
            images = torch.where(self.mirrored[index][:, None, None, None], images.flip(-1), images)
        return images, *rest


class EpochSampler(Sampler[int]):
    """Shuffles with a generator seeded by (seed, epoch), so each epoch's order depends on those two alone.

    A run resumed from a checkpoint therefore sees the batches an uninterrupted run would; `resume_from` makes
    it skip the part of an epoch it had already trained on. Lightning calls `set_epoch` before every epoch.
    """

    def __init__(self, size: int, seed: int, on_epoch: Callable[[int], None] | None = None) -> None:
        self.size, self.seed, self.epoch = size, seed, 0
        self.resume_from: tuple[int, int] | None = None  # (epoch, images of it already trained on)
        self.on_epoch = on_epoch  # called with the epoch as each epoch's order is drawn

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 10_000 + self.epoch))
        if self.on_epoch is not None:
            self.on_epoch(self.epoch)
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


class InMemoryDataModule(L.LightningDataModule):
    """A LightningDataModule whose images sit in memory as one normalized tensor per split, on the device trained on.

    The validation split is drawn from the training images with a seeded generator (`seed`); the test images are
    only ever the test split. Each epoch's order depends on (seed, epoch) alone, and the position in the epoch is
    saved in every checkpoint (`state_dict`), so a resumed run sees the batches an uninterrupted run would. Training
    batches can be augmented (`shift`, `flip`, `erase`) where they are. A subclass says where its images come from
    (`_images`: uint8, N×C×H×W) and which images they are (`identity`), and saves its settings (save_hyperparameters)
    with batch_size, val_size, seed, mean, std, shift, flip and erase among them.
    """

    classes: list[str]
    # What export= writes into model.onnx about its input (cnn_exp/export.py).
    input_description = "float32, (pixel / 255 - mean) / std"

    def __init__(self) -> None:
        super().__init__()
        self.train_set: InMemoryDataset | None = None
        self.val_set: InMemoryDataset | None = None
        self.test_set: InMemoryDataset | None = None
        self.sampler: EpochSampler | None = None
        self._resume_from: tuple[int, int] | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One image's C×H×W as the network gets it."""
        raise NotImplementedError

    @property
    def identity(self) -> str:
        """Which images these are, saved with the epoch's position: a checkpoint of other data is not resumed."""
        raise NotImplementedError

    def _images(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The images of `split` ("train": those trained and validated on, "test"): uint8 N×C×H×W, int64 labels."""
        raise NotImplementedError

    def _measure(self, images: torch.Tensor, train: torch.Tensor) -> None:
        """Called with the training split's images (uint8, on the CPU) and the indices of those trained on, before any
        is normalized: where mean and std come from them (cnn_exp/folder.py), set them in hparams, which checkpoints
        hold."""

    def load_image(self, image: Image.Image, name: str = "image") -> torch.Tensor:
        """An image of one's own (predict=) as this data holds its images: C×H×W, values 0 to 1."""
        raise NotImplementedError

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Images as `load_image` gives them (values 0 to 1), stacked, as the network takes them."""
        mean, std = (_per_channel(self.hparams[key], images) for key in ("mean", "std"))
        return (images - mean) / std

    def setup(self, stage: str) -> None:
        # A network built for other images would fail at its first batch, deep inside; say so before any training.
        shape = getattr(getattr(self.trainer and self.trainer.lightning_module, "net", None), "input_shape", None)
        if shape is not None and tuple(shape) != tuple(self.input_shape):
            size = "×".join(map(str, self.input_shape))
            raise UserError(
                f"the network takes {'×'.join(map(str, shape))} images (model.in_channels, model.image_size), "
                f"but the data's are {size}: set model.in_channels={self.input_shape[0]} and "
                f"model.image_size={self.input_shape[1]}, or leave them out (null takes them from the data)"
            )
        # The images go once to the device the Trainer trains on (the GPU with trainer=gpu), not batch by batch.
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        if stage in ("fit", "validate") and self.train_set is None:
            images, labels = self._images("train")
            val_size = self.hparams.val_size
            if val_size >= len(labels):
                raise UserError(f"data.val_size={val_size} leaves no training images (the set has {len(labels)})")
            generator = torch.Generator().manual_seed(self.hparams.seed)
            order = torch.randperm(len(labels), generator=generator)
            val, train = order[:val_size], order[val_size:]
            self._measure(images, train)
            images, labels, order = (tensor.to(device) for tensor in (self._normalized(images), labels, order))
            val, train = order[:val_size], order[val_size:]
            self.train_set = InMemoryDataset(images[train], labels[train])
            if val_size:
                self.val_set = InMemoryDataset(images[val], labels[val])
        if stage in ("test", "predict") and self.test_set is None:
            images, labels = self._images("test")
            self.test_set = InMemoryDataset(self._normalized(images).to(device), labels.to(device))

    def train_dataloader(self) -> DataLoader:
        self.sampler = EpochSampler(len(self.train_set), self.hparams.seed, self._alternating_flips())
        if self._resume_from and self.trainer and self.trainer.world_size > 1:
            # Lightning shards the sampler's full order across ranks, so it cannot skip a part of it.
            log.warning("resuming under DDP restarts the interrupted epoch's data order from its beginning")
            self._resume_from = None
        self.sampler.resume_from, self._resume_from = self._resume_from, None
        return DataLoader(
            self.train_set, self.hparams.batch_size, sampler=self.sampler, collate_fn=_as_batch, generator=_own()
        )

    def _alternating_flips(self) -> Callable[[int], None] | None:
        """data.flip=alternate (airbench's derandomized flips): a seeded half of the images mirrored in even epochs,
        the other half in odd ones, so every image is seen both ways every two epochs (random flips leave a quarter
        of them unmirrored, or only mirrored, over two epochs). Set per epoch: a resumed run serves the same."""
        if self.hparams.flip != "alternate":
            return None
        train_set = self.train_set
        first = torch.rand(len(train_set), generator=torch.Generator().manual_seed(self.hparams.seed)) < 0.5
        first = first.to(train_set.tensors[0].device)

        def mirror(epoch: int) -> None:
            train_set.mirrored = first ^ bool(epoch % 2)

        return mirror

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
            random_flips = data.flip is True  # data.flip=alternate mirrors as the dataset serves them
            batch = (augment(images, data.shift, random_flips, self._black(images), data.erase), labels)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the data, the epoch in progress and how many of its batches were trained on."""
        batches = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"dataset": self.identity, "epoch": self.sampler.epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["dataset"] != self.identity:
            raise UserError(
                f"the checkpoint was trained on {state['dataset']}, this run asks for {self.identity} "
                "(data=...): resume with the data it was trained on"
            )
        self._resume_from = (state["epoch"], state["batches"] * self.hparams.batch_size)

    def _loader(self, dataset: InMemoryDataset) -> DataLoader:
        # No worker processes: batches are slices of tensors already in memory, workers would only add copies.
        return DataLoader(dataset, batch_size=self.hparams.batch_size, collate_fn=_as_batch, generator=_own())

    def _black(self, images: torch.Tensor) -> float | torch.Tensor:
        """A black pixel, normalized: what augmentation shifts in and erases to (a number for one mean and std)."""
        mean, std = self.hparams.mean, self.hparams.std
        if not isinstance(mean, list | tuple | ListConfig):
            return -mean / std
        return _per_channel([-m / s for m, s in zip(mean, std, strict=True)], images)

    def _normalized(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images as floats, normalized in place (one copy of the set in memory, not three)."""
        images = images.float().div_(255)
        return images.sub_(_per_channel(self.hparams.mean, images)).div_(_per_channel(self.hparams.std, images))


def _per_channel(value: float | list[float], images: torch.Tensor) -> float | torch.Tensor:
    """A mean or std as it applies to N×C×H×W images: one number for all channels, or one per channel."""
    if isinstance(value, list | tuple | ListConfig):
        return torch.tensor(list(value), dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return value


class MNISTDataModule(InMemoryDataModule):
    """Decodes the IDX files once (with torchvision) into normalized float tensors and serves batches by indexing.

    With `val_size=0` every training image is trained on, as in the notebook. `verify=false` skips the MD5 check
    of the files (their headers are always checked).
    """

    input_description = "float32, white on black, (pixel / 255 - mean) / std"

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
        flip: bool | Literal["alternate"] = False,
        erase: float = 0.0,
        verify: bool = True,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise UserError(f"data.dataset={dataset!r} is not one of {sorted(DATASETS)}")
        # Resolved before the settings are saved: a checkpoint holds the numbers it was trained with.
        mean = STATISTICS[dataset][0] if mean is None else mean
        std = STATISTICS[dataset][1] if std is None else std
        check_settings(batch_size, val_size, shift, erase, flip, IMAGE_SIZE)
        if not (is_number(mean) and is_number(std)):
            raise UserError(f"data.mean={mean} and data.std={std} must be numbers")
        check_statistics([mean], [std])
        if flip and dataset == "MNIST":
            shown = "true" if flip is True else flip
            raise UserError(
                f"data.flip={shown} mirrors images, which turns digits into other shapes: FashionMNIST only"
            )
        if not isinstance(verify, bool):
            raise UserError(f"data.verify={verify} must be true or false")
        if classes is not None:
            _check_classes(classes, dataset)
        classes = list(classes) if classes is not None else list(CLASSES[dataset])
        self.save_hyperparameters()
        self.classes = classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (1, IMAGE_SIZE, IMAGE_SIZE)

    @property
    def identity(self) -> str:
        return self.hparams.dataset

    @property
    def files(self) -> RawFiles:
        data = self.hparams
        return RawFiles(data.dataset, data.data_dir, data.mirror, data.download, data.verify, len(self.classes))

    @property
    def raw_dir(self) -> Path:
        return self.files.raw_dir

    def prepare_data(self) -> None:
        """Make sure data_dir holds the dataset's four IDX files, checked (cnn_exp/datafiles.py)."""
        self.files.prepare()

    def load_image(self, image: Image.Image, name: str = "image") -> torch.Tensor:
        """Framed as the dataset framed its images: grey, white on black, 28×28 (cnn_exp/images.py)."""
        return frame(image, self.hparams.dataset, name=name)[None]

    def _images(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Read one split with torchvision: N×1×28×28 uint8 images, N int64 labels."""
        train = split == "train"
        files = f"{'train' if train else 't10k'}-images-idx3-ubyte and -labels-idx1-ubyte in {self.raw_dir}"
        try:
            images = DATASETS[self.hparams.dataset](self.hparams.data_dir, train=train)
        except (RuntimeError, AssertionError, ValueError, OSError) as err:  # changed since prepare_data checked them
            raise UserError(
                f"cannot read {files}: {str(err).strip() or type(err).__name__}. The files are truncated or damaged: "
                "delete them, and the next run copies them again from the mirror or the download."
            ) from None
        return images.data.unsqueeze(1), images.targets


def check_settings(
    batch_size: object, val_size: object, shift: object, erase: object, flip: object, image_size: int
) -> None:
    """The settings every InMemoryDataModule shares, refused before any image is read."""
    if not is_whole(batch_size) or batch_size <= 0:
        raise UserError(f"data.batch_size={batch_size} must be a positive number of images")
    if not is_whole(val_size) or val_size < 0:
        raise UserError(f"data.val_size={val_size} must be 0 (no validation split) or a positive number of images")
    if not is_whole(shift) or shift < 0:
        raise UserError(f"data.shift={shift} must be 0 (off) or a whole number of pixels")
    if shift >= image_size:  # the whole image could leave its frame
        raise UserError(f"data.shift={shift} must be below the images' {image_size} pixels (the recipes shift 2)")
    if not is_number(erase) or not 0 <= erase <= 1:
        raise UserError(f"data.erase={erase} must be a probability from 0 (off) to 1")
    if not (isinstance(flip, bool) or flip == "alternate"):
        raise UserError(f"data.flip={flip} must be true (random), alternate (each image every other epoch) or false")


def check_statistics(mean: list[object], std: list[object]) -> None:
    """Means and standard deviations (one, or one per channel): nan or inf would make every image nan, reported only
    later as a training that diverged."""
    for m in mean:
        if not is_number(m) or not math.isfinite(m):
            raise UserError(f"data.mean={m} must be a finite number")
    for s in std:
        if not is_number(s) or not math.isfinite(s) or s <= 0:
            raise UserError(f"data.std={s} must be a finite number above 0")
