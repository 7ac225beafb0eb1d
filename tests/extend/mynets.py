"""A network of one's own: a small residual CNN, in a file of its own outside cnn_exp/.

What cnn-exp asks of a model: an nn.Module built from plain keyword settings, whose forward(images) returns one
row of class scores (logits) per image, and which says `input_shape` (C, H, W of one image) and `num_classes`.
"""

import torch
import torch.nn.functional as F
from torch import nn


class ResNetlet(nn.Module):
    def __init__(self, width: int = 16, blocks: int = 2, in_channels: int = 1, image_size: int = 28,
                 num_classes: int = 10) -> None:  # fmt: skip
        super().__init__()
        self.input_shape = (in_channels, image_size, image_size)
        self.num_classes = num_classes
        self.stem = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(width, width, kernel_size=3, padding=1) for _ in range(blocks))
        self.head = nn.Linear(width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(images))
        for conv in self.blocks:
            x = x + F.relu(conv(x))  # a residual addition
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))
