"""Reading an image file of one's own, and what it is made into before a network trained on MNIST or Fashion-MNIST
sees it.

An image is made to look like the data the network was trained on before it sees it (`frame`): grey, white on
black, its content fitted into 28×28 the way the dataset framed its images, normalized with the checkpoint's own
mean and std.

- MNIST (LeCun et al.): each digit was "size normalized to fit in a 20×20 pixel box while preserving its aspect
  ratio", then "centered in a 28×28 image by computing the center of mass of the pixels". Here too: the content
  fitted into 20×20, its centre of mass put on pixel (14, 14), where it lies in the dataset's images.
- Fashion-MNIST (Xiao et al., 2017): each product photo was trimmed of its background, its longest edge resized
  to 28, its shortest edge extended to 28 with the product in the middle, and negated. Here too: the content
  fitted into 28×28, its box centred.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from cnn_exp.errors import UserError, shown

PATH = 4096  # a path is shown whole in messages (Linux's PATH_MAX): its end is the file's name

SIZE = 28  # both datasets' images are 28×28


# Per dataset: the box its content is fitted into, and whether it is centred by centre of mass (else by its box).
FRAMING: dict[str, tuple[int, bool]] = {"MNIST": (20, True), "FashionMNIST": (28, False)}


# Pixels brighter than this share of the content's range (after the background is made black) are content: the
# box around them is what gets fitted. At 10% the box of the dataset's own images is their 20×20 (MNIST) or
# 28×28 (Fashion-MNIST) box again, so a dataset image read back from a file comes out as it was stored.
CONTENT = 0.1


# An image whose brightest and darkest pixels differ by less than this (of 255) has nothing drawn on it.
BLANK = 16


def read_image(path: str | Path) -> Image.Image:
    """Read any image file Pillow knows (PNG, JPEG, BMP, ...) as grey; a file it cannot read is a UserError."""
    return grey(open_image(path))


def open_image(path: str | Path) -> Image.Image:
    """Read any image file Pillow knows (PNG, JPEG, BMP, ...), decoded and upright; a file it cannot read is a
    UserError. Its messages show the path as data (`shown`): a file's name may hold anything, an escape sequence or
    a newline.
    """
    name = shown(path, PATH)
    try:
        with Image.open(path) as image:
            image.load()  # decodes now, so a damaged file fails here and not later
            image = ImageOps.exif_transpose(image)  # a phone photo stands the way it was taken
    except UnidentifiedImageError:
        raise UserError(f"{name}: not an image (Pillow cannot read it as PNG, JPEG, BMP or another format)") from None
    except Image.DecompressionBombError:
        raise UserError(
            f"{name}: too large to be a picture of one item ({Image.MAX_IMAGE_PIXELS} pixels at most)"
        ) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(
            f"{name}: damaged or truncated image ({shown(str(err).strip() or type(err).__name__)})"
        ) from None
    return image


def grey(image: Image.Image) -> Image.Image:
    """One grey channel; transparent parts (a drawing app's empty canvas) become white paper."""
    return without_alpha(image, "L")


def without_alpha(image: Image.Image, mode: str) -> Image.Image:
    """The image in `mode` ("L": grey, "RGB"), its transparent parts made white paper; 16-bit grey scaled to 8 bits
    (Pillow's own conversion would clip it at 255)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        pixels = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(
            np.round(pixels * 255 / (65535 if pixels.max() > 255 else 255)).clip(0, 255).astype(np.uint8)
        )
    elif image.mode == "F":
        raise UserError(f"{image.mode} images (floating-point pixels) are not read: save them as 8- or 16-bit images")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        paper = Image.new("RGBA", image.size, "white")
        image = Image.alpha_composite(paper, image.convert("RGBA"))
    return image.convert(mode)


def frame(image: Image.Image, dataset: str, name: str = "image") -> torch.Tensor:
    """A grey image as its dataset would have stored it: 28×28, white content on black, values 0 to 1.

    Light background (the median of its outermost pixels): inverted. Levels: the background (2nd percentile)
    becomes black and the brightest pixel white, as in the datasets' own images. Then the content's box is fitted
    and centred as the dataset did (see the module's docstring). An image with nothing on it is a UserError.
    """
    box, by_mass = FRAMING[dataset]
    try:  # transparent parts white paper, 16-bit grey scaled, as a folder's images are read
        pixels = np.asarray(grey(image), dtype=np.float32)
    except UserError as err:
        raise UserError(f"{shown(name, PATH)}: {err}") from None
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if np.median(border) > 127:
        pixels = 255 - pixels
    low, high = np.percentile(pixels, 2), pixels.max()
    if high - low < BLANK:
        raise UserError(f"{shown(name, PATH)}: blank, there is nothing on it to classify")
    pixels = np.clip((pixels - low) / (high - low), 0, 1)
    rows, cols = np.nonzero(pixels > CONTENT)
    content = pixels[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = content.shape
    scale = box / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # Pillow's resampling filters average over the pixels they shrink: grey edges, as the datasets' anti-aliasing.
    fitted = np.asarray(
        Image.fromarray(np.round(content * 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR),
        dtype=np.float32,
    )
    height, width = fitted.shape
    if by_mass:
        mass = fitted.sum()
        centre_row = (fitted.sum(axis=1) * np.arange(height)).sum() / mass
        centre_col = (fitted.sum(axis=0) * np.arange(width)).sum() / mass
        top, left = round(SIZE // 2 - centre_row), round(SIZE // 2 - centre_col)
    else:
        top, left = (SIZE - height + 1) // 2, (SIZE - width + 1) // 2
    top, left = min(max(top, 0), SIZE - height), min(max(left, 0), SIZE - width)  # the content stays whole
    canvas = np.zeros((SIZE, SIZE), dtype=np.float32)
    canvas[top : top + height, left : left + width] = fitted
    return torch.from_numpy(canvas / 255)
