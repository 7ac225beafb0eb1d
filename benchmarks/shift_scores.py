"""Validation accuracy of a Fashion-MNIST checkpoint scored on each image alone, with its mirror (what
`classifier.flip_average` does), and with copies shifted by one pixel as well: does averaging more views pay?

Run from the repository root: `python -m benchmarks.shift_scores <checkpoint> --mirror ../shared/datasets`. The
validation split is the one the checkpoint's run held out (its seed and `data.val_size`), so runs compare on the
same images; it prints one line a variant, with the images it got right or wrong against the image alone.
"""

import argparse

import torch
import torch.nn.functional as F

from cnn_exp.errors import UserError
from cnn_exp.predict import from_checkpoint

FOUR = [(1, 0), (-1, 0), (0, 1), (0, -1)]
EIGHT = [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if (dx, dy) != (0, 0)]


def shifted(images: torch.Tensor, dx: int, dy: int, background: float) -> torch.Tensor:
    """The images moved dx pixels right and dy down, the uncovered edge filled with the background."""
    padded = F.pad(images, (1, 1, 1, 1), value=background)
    height, width = images.shape[-2:]
    return padded[..., 1 - dy : 1 - dy + height, 1 - dx : 1 - dx + width]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--mirror", default=None, help="a folder holding the datasets' raw IDX files")
    args = parser.parse_args()

    try:
        model, datamodule = from_checkpoint(args.checkpoint, mirror=args.mirror)
        datamodule.prepare_data()
        datamodule.setup("fit")
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    if datamodule.val_set is None:
        raise SystemExit("error: the checkpoint's run held out no validation images (data.val_size=0)")
    images, labels = datamodule.val_set.tensors
    background = -datamodule.hparams.mean / datamodule.hparams.std
    net = model.net.eval()

    @torch.no_grad()
    def log_probabilities(batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([net(part).log_softmax(dim=1) for part in batch.split(1000)])

    mirrored = images.flip(-1)
    plain, mirror = log_probabilities(images), log_probabilities(mirrored)
    views = {
        "image alone": [plain],
        "with its mirror": [plain, mirror],
        "and 4 shifts": [plain, mirror],
        "and 8 shifts": [plain, mirror],
    }
    for dx, dy in EIGHT:
        both = [log_probabilities(shifted(x, dx, dy, background)) for x in (images, mirrored)]
        views["and 8 shifts"] += both
        if (dx, dy) in FOUR:
            views["and 4 shifts"] += both

    alone = None
    for name, scores in views.items():
        right = torch.stack(scores).logsumexp(dim=0).argmax(dim=1) == labels
        alone = right if alone is None else alone
        print(
            f"{name:16s} {right.float().mean().item():.2%} of {len(labels):,} "
            f"(+{(right & ~alone).sum().item()} -{(~right & alone).sum().item()} against the image alone)"
        )


if __name__ == "__main__":
    main()
