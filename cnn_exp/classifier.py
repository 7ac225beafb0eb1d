"""The LightningModule: trains one network with cross-entropy and logs loss and accuracy per split."""

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix


class Classifier(L.LightningModule):
    """Owns the loss, metrics, optimizer and scheduler; the network itself is a plain `nn.Module`.

    It takes the configs of the network, optimizer and scheduler as plain dicts and builds them itself, so the
    hyperparameters saved in a checkpoint are plain values: the checkpoint alone rebuilds the model, and it
    loads under torch's safe `weights_only` default.
    """

    def __init__(self, net: dict[str, Any], optimizer: dict[str, Any], scheduler: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = instantiate(net)
        # One blank image: the model summary then shows every layer's input and output shape.
        self.example_input_array = torch.zeros(1, *self.net.input_shape)
        classes = self.net.out.out_features
        # One metric object per split, so their running states never mix.
        self.train_acc = MulticlassAccuracy(classes, average="micro")
        self.val_acc = MulticlassAccuracy(classes, average="micro")
        self.test_acc = MulticlassAccuracy(classes, average="micro")
        # Confusion matrices of the current validation and test epoch, for per-class accuracy and the reports
        # that callbacks draw from them (cnn_exp/callbacks.py).
        self.val_confusion = MulticlassConfusionMatrix(classes)
        self.test_confusion = MulticlassConfusionMatrix(classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._step(batch, "train", self.train_acc)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        _, logits = self._step(batch, "val", self.val_acc)
        self.val_confusion.update(logits.argmax(dim=1), batch[1])
        return logits

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        _, logits = self._step(batch, "test", self.test_acc)
        self.test_confusion.update(logits.argmax(dim=1), batch[1])
        return logits

    def configure_optimizers(self) -> Any:
        optimizer = instantiate(self.hparams.optimizer)(self.parameters())
        if not self.hparams.scheduler:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": instantiate(self.hparams.scheduler)(optimizer)}

    def on_validation_epoch_start(self) -> None:
        self.val_confusion.reset()

    def on_test_epoch_start(self) -> None:
        self.test_confusion.reset()

    def _step(
        self, batch: tuple[torch.Tensor, torch.Tensor], split: str, accuracy: MulticlassAccuracy
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        accuracy(logits, labels)
        # Training loss also per step, for the curve; every epoch value is the mean over its images, and over all
        # ranks under DDP (sync_dist; torchmetrics syncs the accuracy itself).
        self.log(
            f"{split}/loss",
            loss,
            on_step=split == "train",
            on_epoch=True,
            prog_bar=True,
            batch_size=len(labels),
            sync_dist=True,
        )
        self.log(f"{split}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss, logits.detach()
