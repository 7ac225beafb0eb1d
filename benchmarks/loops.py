"""The plain loops that compare.py measures our train.py path against.

- notebook: the lab notebook's loop: a torchvision dataset with per-sample ToTensor (and Normalize for MNIST)
  through a shuffling DataLoader.
- bare: the same network, optimizer and per-step bookkeeping, fed by slicing one normalized in-memory tensor
  (on the GPU with --device cuda); with --channels-last, in the NHWC memory format our configs use.
- lightning: the bare loop's batches and step inside an otherwise empty Lightning Trainer (no logger, callbacks,
  checkpoints, progress bar or metrics): what Lightning's own loop costs, before anything of ours.

The bare and Lightning loops train in fp32, or with --precision bf16-mixed under bf16 autocast as Lightning's
bf16-mixed does (forward and loss autocast, backward and SGD in fp32); the notebook's loop always in fp32, as it ran.

All train the network our configs build (conf/model), with plain SGD as in the notebook, and print one JSON line:
the wall-clock time of the first training step and each epoch's duration.
"""

import argparse
import itertools
import json
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from torchvision import transforms

from cnn_exp import build, schema
from cnn_exp.data import DATASETS, MNISTDataModule
from cnn_exp.precision import BF16, FP32

RECIPES = {  # dataset, normalization (None: ToTensor only), as in the notebook
    "mnist": ("MNIST", (0.1307, 0.3081)),
    "fashion": ("FashionMNIST", None),
}


def batches(args: argparse.Namespace):
    """One epoch's (images, labels) batches, as the chosen loop makes them."""
    name, norm = RECIPES[args.data]
    if args.loop == "notebook":
        steps = [transforms.ToTensor()] + ([transforms.Normalize(*norm)] if norm else [])
        dataset = DATASETS[name](args.data_dir, train=True, transform=transforms.Compose(steps))
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True)
        return lambda: iter(loader)
    split = DATASETS[name](args.data_dir, train=True)
    mean, std = norm or (0.0, 1.0)
    images = split.data.unsqueeze(1).float().div(255).sub(mean).div(std).to(args.device)
    labels = split.targets.to(args.device)

    def epoch():
        order = torch.randperm(len(labels), device=args.device)
        for i in range(0, len(labels), args.batch_size):
            index = order[i : i + args.batch_size]
            yield images[index], labels[index]

    return epoch


class BareStep(L.LightningModule):
    """The bare loop's step, bookkeeping included, as a LightningModule."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network, self.total_loss, self.correct = network, 0.0, 0

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        predictions = self.network(images)
        loss = F.cross_entropy(predictions, labels)
        self.total_loss += loss.item()
        self.correct += predictions.argmax(dim=1).eq(labels).sum().item()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.network.parameters(), lr=0.1)


class Epochs:
    """The bare loop's batches as an iterable Lightning can run epochs over (each ends when its batches do)."""

    def __init__(self, epoch) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(self.epoch())


class Clock(L.Callback):
    """The first step's wall-clock time and each epoch's start and end, timed as EpochTimer times train.py."""

    def __init__(self) -> None:
        self.first_step, self.starts = None, []

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: object, i: int) -> None:
        self.first_step = self.first_step or time.time()

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.starts.append(time.perf_counter())  # the last epoch's end, before the Trainer's teardown


def run_lightning(network: torch.nn.Module, epoch_batches, args: argparse.Namespace) -> dict:
    clock = Clock()
    trainer = L.Trainer(
        accelerator=args.device, devices=1, max_epochs=args.epochs, precision=args.precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[clock],
    )  # fmt: skip
    trainer.fit(BareStep(network), Epochs(epoch_batches))
    return {"first_step": clock.first_step, "epochs": [b - a for a, b in itertools.pairwise(clock.starts)]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("loop", choices=["notebook", "bare", "lightning"])
    parser.add_argument("--model", default="net2")
    parser.add_argument("--data", default="mnist", choices=RECIPES)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default=FP32, choices=[FP32, BF16], help="the bare and Lightning loops'")
    parser.add_argument("--channels-last", action="store_true", help="NHWC weights, as our configs use")
    args = parser.parse_args()
    if args.loop == "notebook" and args.precision != FP32:
        parser.error("the notebook's loop trains in fp32, as the notebook did")

    torch.manual_seed(0)
    # Composed as train.py composes it: net3's file holds only what differs from net2 (its defaults list), and the
    # config's defaults list names the schemas train.py registers first.
    schema.store()
    with initialize_config_dir(str(Path("conf").resolve()), version_base="1.3"):
        model = compose("train", overrides=[f"model={args.model}"]).model
    # The shape and classes the config leaves null come from the data, as in train.py.
    settings = build.with_data_shape(
        OmegaConf.to_container(model, resolve=True), MNISTDataModule(RECIPES[args.data][0])
    )
    network = instantiate(settings, channels_last=args.channels_last)
    network = network.to(args.device)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    epoch_batches = batches(args)
    if args.loop == "lightning":
        print(json.dumps(run_lightning(network, epoch_batches, args)))
        return
    first_step, durations = None, []
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == BF16)
    for _ in range(args.epochs):
        start = time.perf_counter()
        total_loss, correct = 0.0, 0
        for batch in epoch_batches():
            images, labels = (t.to(args.device) for t in batch)
            first_step = first_step or time.time()
            with autocast:
                predictions = network(images)
                loss = F.cross_entropy(predictions, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
            correct += predictions.argmax(dim=1).eq(labels).sum().item()
        durations.append(time.perf_counter() - start)  # .item() each step keeps the GPU in step with the clock
    print(json.dumps({"first_step": first_step, "epochs": durations, "correct": correct}))


if __name__ == "__main__":
    main()
