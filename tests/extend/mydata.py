"""A DataModule of one's own: generated colour images of stripes, the class their direction, in a file of its own.

What cnn-exp asks of a DataModule besides Lightning's hooks (docs/extend.md#your-data): `classes` (names in label
order), `input_shape` (C, H, W), its settings saved with `save_hyperparameters()`, and for predict= `load_image`
and `normalize`.
"""

import math

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset


class Stripes(L.LightningDataModule):
    def __init__(self, size: int = 24, per_class: int = 64, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()  # what test.py rebuilds it from
        self.classes = ["horizontal", "diagonal", "vertical"]
        self.input_shape = (3, size, size)

    def setup(self, stage: str) -> None:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        count, size = self.hparams.per_class, self.hparams.size
        y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        images, labels = [], []
        for label in range(len(self.classes)):
            angle = label * math.pi / 4 + math.pi / 2
            for _ in range(count * 2):  # half to train on, a quarter each to validate and test on
                phase = torch.rand(1, generator=generator) * 6.28
                stripes = (torch.sin((x * math.cos(angle) + y * math.sin(angle)) * 1.2 + phase) > 0).float()
                colour = torch.rand(3, 1, 1, generator=generator)
                images.append(stripes * colour + 0.1 * torch.randn(3, size, size, generator=generator))
                labels.append(label)
        order = torch.randperm(len(labels), generator=generator)
        images, labels = self.normalize(torch.stack(images).clamp(0, 1))[order], torch.tensor(labels)[order]
        half, three_quarters = len(labels) // 2, len(labels) * 3 // 4
        self.train = TensorDataset(images[:half], labels[:half])
        self.val = TensorDataset(images[half:three_quarters], labels[half:three_quarters])
        self.test = TensorDataset(images[three_quarters:], labels[three_quarters:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, self.hparams.batch_size)

    def load_image(self, image: Image.Image, name: str = "image") -> torch.Tensor:
        """An image file as these images are: RGB, size × size, values 0 to 1."""
        size = self.hparams.size
        pixels = np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32) / 255
        return torch.from_numpy(pixels).permute(2, 0, 1)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - 0.5) / 0.25
