"""A folder of one's own images as a DataModule: `python train.py data=folder data.root=DIR`.

The layout is torchvision's ImageFolder's: `DIR/train/<class>/<image>`, and optionally `DIR/test/<class>/<image>`
(else a share of train/ is set aside as the test split, the same images for every run). Class names are the folder
names, in sorted order. Every image is read once with Pillow, made grey or colour (`channels`) and resized to
`image_size` × `image_size`, and held in memory like MNIST (cnn_exp/data.py: seeded validation split, exact resume,
batch augmentation). The mean and standard deviation per channel are measured on the images trained on and saved
with the other settings in every checkpoint, which test.py, predict= and export= then use.

A folder is input: a missing or empty class, an image Pillow cannot read, one class only, or test classes unlike the
training ones are each one error line naming the folder or file.
"""

import hashlib
import logging
import os
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.transforms.functional import pil_to_tensor

from cnn_exp.data import MAX_NAME, InMemoryDataModule, check_settings, check_statistics
from cnn_exp.errors import UserError, is_number, is_whole, shown
from cnn_exp.images import PATH, open_image, without_alpha

log = logging.getLogger(__name__)

# The test split drawn from train/ when there is no test/ folder: drawn with this seed whatever the run's seed, so
# that runs with other seeds are compared on the same test images.
TEST_SEED = 0
# Images measured at a time for the mean and standard deviation (float64 sums: exact enough for any folder size).
CHUNK = 4096


def _list(directory: Path, where: str) -> tuple[list[str], list[tuple[Path, int]]]:
    """The class folders of `directory` (sorted, hidden ones left out) and its image files with their class index,
    found as torchvision's ImageFolder finds them (by extension, in subfolders too), without following links to
    folders (a link to a folder above would be walked forever)."""
    if not directory.is_dir():
        raise UserError(f"{where} is not a folder")
    classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise UserError(f"{where} holds no class folders: put each class's images in a folder of its own there")
    for name in classes:
        if name != name.encode("utf-8", "surrogateescape").decode("utf-8", "replace"):
            raise UserError(f"{where}/{shown(name)}: a class name must be text (UTF-8): rename the folder")
        if len(name) > MAX_NAME:
            raise UserError(f"{where}/{shown(name[:40])}…: a class name has at most {MAX_NAME} characters")
    samples = []
    for index, name in enumerate(classes):
        found = []
        for folder, subfolders, files in os.walk(directory / name):
            subfolders[:] = sorted(sub for sub in subfolders if not sub.startswith("."))
            found += [
                Path(folder) / file
                for file in sorted(files)
                if not file.startswith(".")
                and has_file_allowed_extension(file, IMG_EXTENSIONS)
                and (Path(folder) / file).is_file()  # not a FIFO, which reading would wait on forever
            ]
        if not found:
            raise UserError(
                f"{where}/{shown(name)} holds no image (files ending in {', '.join(IMG_EXTENSIONS[:5])}, …): add "
                "images or remove the folder"
            )
        samples += [(path, index) for path in found]
    return classes, samples


def _digest(root: str, samples: list[tuple[Path, int]], test_samples: list[tuple[Path, int]] | None) -> str:
    """A digest of which files are which class's, in each split: another image, a renamed or moved one changes it."""
    lines = [f"train {label} {path.relative_to(root)}" for path, label in samples]
    lines += [f"test {label} {path.relative_to(root)}" for path, label in test_samples or []]
    return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()


def _share(value: object, total: int, name: str) -> int:
    """A split's size from its setting: a share of `total` (0 to below 1) or a whole number of images."""
    if is_whole(value) and value >= 0:
        count = int(value)
    elif is_number(value) and 0 < value < 1:
        count = round(value * total)
    else:
        raise UserError(f"data.{name}={value} must be a share of the images (0.1) or a whole number of them (500)")
    if count >= total:
        raise UserError(f"data.{name}={value} sets aside {count} of the {total} images in train/: none are left")
    return count


def _is_grey(image: Image.Image) -> bool:
    """Whether an image holds no colour: one channel, or three equal ones."""
    if image.mode in ("1", "L", "LA", "I", "I;16", "F"):
        return True
    red, green, blue = without_alpha(image, "RGB").split()
    return red.tobytes() == green.tobytes() == blue.tobytes()


class FolderDataModule(InMemoryDataModule):
    """Images in an ImageFolder layout (see the module's docstring), held in memory as normalized tensors.

    A new run reads the folder's listing as it is built and saves with its settings what it found: the class names,
    the image shape, and `listing`, a digest of the file names. Rebuilt from a checkpoint (those given), it reads the
    folder only to serve images, and refuses a folder whose files are no longer those it was trained and tested on:
    predict= and export= need no folder at all.
    """

    def __init__(
        self,
        root: str,
        image_size: int | None = None,
        channels: int | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        batch_size: int = 64,
        val_size: int | float = 0.1,
        test_size: int | float = 0.2,
        seed: int = 0,
        shift: int = 0,
        flip: bool | Literal["alternate"] = False,
        erase: float = 0.0,
        classes: list[str] | None = None,
        listing: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(root, str) or not root.strip():
            raise UserError("data.root must name a folder of images: data.root=DIR, with DIR/train/<class>/<image>")
        root = os.path.abspath(root)  # a checkpoint names the folder wherever it is used from
        self._where = f"data.root={shown(root, PATH)}"
        self._found: tuple[list[str], list[tuple[Path, int]], list[tuple[Path, int]] | None] | None = None
        if listing is None:  # a new run: what the folder holds decides
            classes, samples, test_samples = self._found = self._scan(root)
            listing = _digest(root, samples, test_samples)
            test_size = 0 if test_samples is not None else _share(test_size, len(samples), "test_size")
            if test_samples is None and test_size == 0:
                raise UserError(
                    f"{self._where}: no test/ folder and data.test_size=0 leave no test images: add test/<class>/ or "
                    "set data.test_size"
                )
            val_size = _share(val_size, len(samples) - test_size, "val_size")
            # From the first image of each class; saved, so a checkpoint holds the shape it was trained with.
            firsts = [next(path for path, label in samples if label == i) for i in range(len(classes))]
            if channels is None:
                channels = 1 if all(_is_grey(open_image(path)) for path in firsts) else 3
            if image_size is None:
                image_size = max(open_image(firsts[0]).size)
                if image_size > 4096:
                    raise UserError(
                        f"{self._where}: the first image is {image_size} pixels wide: set data.image_size, at most "
                        "4096, to resize the images to"
                    )
            self._check_memory(len(samples) + len(test_samples or []), channels or 3, image_size)
        elif not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
            raise UserError("data.classes must list the class names with data.listing (both come from a checkpoint)")
        if channels not in (1, 3):
            raise UserError(f"data.channels={channels} must be 1 (grey) or 3 (colour), or null (from the images)")
        if not is_whole(image_size) or not 1 <= image_size <= 4096:
            raise UserError(f"data.image_size={image_size} must be a whole number of pixels from 1 to 4096")
        check_settings(batch_size, val_size, shift, erase, flip, image_size)
        for name, value in (("mean", mean), ("std", std)):
            if value is not None and (not isinstance(value, list | tuple) or len(value) != channels):
                raise UserError(f"data.{name}={value} must be a list of {channels} numbers (one per channel) or null")
        if (mean is None) != (std is None):
            raise UserError("data.mean and data.std are measured together: give both, or neither (null)")
        if mean is not None:
            check_statistics(list(mean), list(std))
            mean, std = [float(m) for m in mean], [float(s) for s in std]
        classes = list(classes)
        self.save_hyperparameters()
        self.classes = classes
        self._decoded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _scan(self, root: str) -> tuple[list[str], list[tuple[Path, int]], list[tuple[Path, int]] | None]:
        """The folder's class names, training images and test/ images (None without test/), checked."""
        if not Path(root).is_dir():
            raise UserError(f"{self._where}: no such folder")
        classes, samples = _list(Path(root) / "train", f"{self._where}: train")
        if len(classes) < 2:
            raise UserError(
                f"{self._where}: train/ holds one class ({shown(classes[0])}): a classifier needs two or more"
            )
        test_samples = None
        if (Path(root) / "test").exists():
            test_classes, test_samples = _list(Path(root) / "test", f"{self._where}: test")
            if test_classes != classes:
                only = sorted(set(test_classes) ^ set(classes))
                raise UserError(
                    f"{self._where}: test/ has other classes than train/ (only in one of them: "
                    f"{', '.join(shown(name) for name in only[:5])}): give both the same class folders"
                )
        return classes, samples, test_samples

    def _files(self) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]] | None]:
        """The training and test/ images, read once; refused if the folder no longer holds what the settings say."""
        if self._found is None:
            found = self._scan(self.hparams.root)
            classes, samples, test_samples = found
            if classes != self.classes or _digest(self.hparams.root, samples, test_samples) != self.hparams.listing:
                raise UserError(
                    f"{self._where}: the folder holds other images than this run's data (its class folders or file "
                    f"names changed: {len(samples)} training images, classes {', '.join(map(shown, classes[:5]))}): "
                    "use the folder as it was, or train a new run on it"
                )
            self._found = found
        return self._found[1], self._found[2]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        size = self.hparams.image_size
        return (self.hparams.channels, size, size)

    @property
    def identity(self) -> str:
        return f"the images in {self.hparams.root} (listing {self.hparams.listing[:12]})"

    @property
    def input_description(self) -> str:  # type: ignore[override]
        kind = "grey" if self.hparams.channels == 1 else "RGB"
        size = self.hparams.image_size
        return f"float32, {kind}, resized to {size}×{size}, (pixel / 255 - mean[channel]) / std[channel]"

    def load_image(self, image: Image.Image, name: str = "image") -> torch.Tensor:
        """Made as the folder's own images were (`_pixels`), values 0 to 1."""
        return self._pixels(image).float() / 255

    def _images(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        # Training reads the test images too, before it starts: a file that cannot be read is found now, not after
        # the last epoch.
        for part in ("train", "test") if split == "train" else (split,):
            if part not in self._decoded:
                samples = self._split_samples(part)
                log.info("reading %d %s images from %s", len(samples), part, shown(self.hparams.root, PATH))
                images = torch.stack([self._read(path) for path, _ in samples])
                labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
                self._decoded[part] = (images, labels)
        return self._decoded.pop(split)

    def _split_samples(self, split: str) -> list[tuple[Path, int]]:
        """train/'s images less the test share (when there is no test/), or the test images."""
        samples, test_samples = self._files()
        if test_samples is not None:
            return samples if split == "train" else test_samples
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(TEST_SEED)).tolist()
        test = set(order[: self.hparams.test_size])
        return [sample for i, sample in enumerate(samples) if (i in test) == (split == "test")]

    def _read(self, path: Path) -> torch.Tensor:
        """One file as uint8 C×H×W; a file Pillow cannot read, or whose pixels cannot be used, refused by its name."""
        try:
            return self._pixels(open_image(path))
        except UserError as err:
            if str(err).startswith(shown(str(path), PATH)):
                raise
            raise UserError(f"{shown(str(path), PATH)}: {err}") from None

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        """An image made grey or RGB (transparent parts white) and resized to image_size: uint8 C×H×W."""
        size = self.hparams.image_size
        mode = "L" if self.hparams.channels == 1 else "RGB"
        return pil_to_tensor(without_alpha(image, mode).resize((size, size), Image.Resampling.BILINEAR))

    def _normalized(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.mean is None:  # measured only as a run reads its training images
            raise UserError(
                "data.mean and data.std are not known (null in the checkpoint): test a checkpoint train.py wrote"
            )
        return super()._normalized(images)

    def _measure(self, images: torch.Tensor, train: torch.Tensor) -> None:
        """The mean and standard deviation of each channel over the images trained on, unless the config gives
        them; saved in the settings, so that test.py and predict= normalize as training did."""
        if self.hparams.mean is not None:
            return
        total = torch.zeros(images.shape[1], dtype=torch.float64)
        squares = torch.zeros_like(total)
        for start in range(0, len(train), CHUNK):
            chunk = images[train[start : start + CHUNK]].double().div_(255)
            total += chunk.sum(dim=(0, 2, 3))
            squares += chunk.square().sum(dim=(0, 2, 3))
        count = len(train) * images.shape[2] * images.shape[3]
        mean = total / count
        std = (squares / count - mean.square()).clamp(min=0).sqrt()
        if (std < 1e-3).any():
            raise UserError(f"data.root={shown(self.hparams.root, PATH)}: the training images are all one colour")
        self.hparams.mean = [round(float(m), 6) for m in mean]
        self.hparams.std = [round(float(s), 6) for s in std]
        log.info("data: mean %s and std %s measured on %d training images", self.hparams.mean, self.hparams.std,
                 len(train))  # fmt: skip

    @staticmethod
    def _check_memory(count: int, channels: int, size: int) -> None:
        """Refuse a folder whose images would not fit this machine's memory as float32 tensors, before reading one."""
        needed = 5 * count * channels * size * size  # uint8 as read, and float32 as held
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if needed > memory:
            raise UserError(
                f"{count:,} images of {channels}×{size}×{size} need {needed / 2**30:,.1f} GiB in memory, more than "
                f"this machine's {memory / 2**30:.0f} GiB: set a smaller data.image_size"
            )
