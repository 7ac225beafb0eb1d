"""Validation accuracy of a Fashion-MNIST checkpoint scored on each image alone, with its mirror (what
`classifier.flip_average` does), and with copies shifted by one pixel as well: does averaging more views pay?

Run from the repository root: `python -m benchmarks.shift_scores <checkpoint> --mirror ../shared/datasets`. The
validation split is the one the checkpoint's run held out (its seed and `data.val_size`), so runs compare on the
same images; it prints one line a variant, with the images it got right or wrong against the image alone. The line
that matches the run's own val/acc is "image alone", or "with its mirror" for a run with `classifier.flip_average`
(here in fp32: a run validated in bf16 may differ by a few images).
"""

import argparse

import torch

from cnn_exp.classifier import flip_averaged
from cnn_exp.data import translate
from cnn_exp.errors import UserError
from cnn_exp.predict import from_checkpoint

FOUR = [(1, 0), (-1, 0), (0, 1), (0, -1)]
EIGHT = [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if (dx, dy) != (0, 0)]


def shifted(images: torch.Tensor, dx: int, dy: int, background: float) -> torch.Tensor:
    """The images moved dx pixels right and dy down, the uncovered edge filled with the background: the shift
    training's `data.shift` draws at random, here the same for every image."""
    return translate(images, torch.tensor([[-dx, -dy]]).expand(len(images), 2), background)


def main() -> None:
    """Score the checkpoint's validation images each way and print one line a way."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--mirror", default=None, help="a folder holding the datasets' raw IDX files")
    args = parser.parse_args()

    try:
        # Without --mirror, the mirror the run was trained with.
        model, datamodule = from_checkpoint(args.checkpoint, **({"mirror": args.mirror} if args.mirror else {}))
        if not datamodule.hparams.val_size:
            raise UserError(f"{args.checkpoint}'s run held out no validation images (data.val_size=0)")
        datamodule.prepare_data()
        datamodule.setup("fit")
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    images, labels = datamodule.val_set.tensors
    background = -datamodule.hparams.mean / datamodule.hparams.std
    net = model.net.eval()

    @torch.no_grad()
    def scores(batch: torch.Tensor, mirror: bool) -> torch.Tensor:
        """Log-probabilities of each image, or (as classifier.flip_average scores) of it and its mirror."""
        view = (lambda part: flip_averaged(net, part)) if mirror else (lambda part: net(part).log_softmax(dim=1))
        return torch.cat([view(part) for part in batch.split(1000)])

    with_mirror = scores(images, mirror=True)
    # Each shift with its mirror; FOUR and EIGHT hold each shift's mirror image too, so the order does not matter.
    moved = {shift: scores(shifted(images, *shift, background), mirror=True) for shift in EIGHT}
    views = {
        "image alone": [scores(images, mirror=False)],
        "with its mirror": [with_mirror],
        "and 4 shifts": [with_mirror, *(moved[shift] for shift in FOUR)],
        "and 8 shifts": [with_mirror, *moved.values()],
    }

    alone = None
    for name, parts in views.items():
        right = torch.stack(parts).logsumexp(dim=0).argmax(dim=1) == labels
        line = f"{name:16s} {right.float().mean().item():.2%} of {len(labels):,}"
        if alone is None:
            alone = right
        else:
            line += f" (+{(right & ~alone).sum().item()} -{(~right & alone).sum().item()} against the image alone)"
        print(line)


if __name__ == "__main__":
    main()
