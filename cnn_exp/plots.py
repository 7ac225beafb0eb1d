"""The figures a person looks at: a confusion matrix with class names, and a grid of images with their labels."""

import math

import torch
from matplotlib.figure import Figure
from torchmetrics.classification import MulticlassConfusionMatrix


def confusion_figure(matrix: torch.Tensor, classes: list[str], title: str) -> Figure:
    """Counts per (true, predicted) class pair, drawn by torchmetrics on a figure large enough for the names."""
    figure = Figure(figsize=(9, 8), layout="constrained")
    ax = figure.add_subplot()
    MulticlassConfusionMatrix(num_classes=len(classes)).plot(val=matrix.cpu(), ax=ax, labels=classes)
    ax.tick_params(axis="x", labelrotation=45)
    ax.set_title(title)
    return figure


def image_grid(
    images: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor, classes: list[str], title: str
) -> Figure:
    """Images with `true → predicted` under each, red where the prediction is wrong."""
    columns = max(1, min(8, len(images)))
    rows = max(1, math.ceil(len(images) / columns))
    figure = Figure(figsize=(1.6 * columns, 1.9 * rows + 0.5), layout="constrained")
    figure.suptitle(title)
    for i, (image, label, prediction) in enumerate(
        zip(images.cpu(), labels.tolist(), predictions.tolist(), strict=True)
    ):
        ax = figure.add_subplot(rows, columns, i + 1)
        ax.imshow(image.squeeze(0), cmap="gray")
        ax.set_xticks([])
        ax.set_yticks([])
        color = "black" if label == prediction else "red"
        ax.set_xlabel(f"{classes[label]} → {classes[prediction]}", fontsize=8, color=color)
    return figure
