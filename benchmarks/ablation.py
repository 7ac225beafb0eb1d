"""What each method adds to a fast recipe, chosen on validation: airbench's ablation, for our recipes.

    python -m benchmarks.ablation --recipe fashion_fast --mirror ../shared/datasets --seeds 0 1
    python -m benchmarks.ablation --recipe mnist_fast --mirror ../shared/datasets --seeds 0 1
    python -m benchmarks.ablation --recipe fashion_best --mirror ../shared/datasets --seeds 0

Row 0 is the recipe with its methods off (its network, batch, epochs, optimizer and label smoothing kept, the
learning rate annealed per epoch); each row after it adds one method, so the last of the cumulative rows is the
recipe itself; rows marked "not kept" add a method to the whole recipe that it leaves out. Every run trains on 55,000
images and is scored on the 5,000 validation images it never trained on (data.val_size=5000), after its last epoch;
none is tested (test=false): the test split decides nothing. Each run is `python train.py experiment=<recipe>
<row's overrides> seed=<s>`, in a process of its own. Prints a Markdown table: validation accuracy per seed, their
mean, and the change from the row above; for a recipe with a bar to reach (fashion_best: 94 %), also the first epoch
whose validation accuracy reached it, per seed (airbench's "epochs to 94 %", within the recipe's own schedule: each
run keeps the recipe's number of epochs, and so the schedule's length).
"""

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.compare import ROOT
from cnn_exp.data import DATASETS, MNISTDataModule

# Every method off: the starting row. The recipes keep their optimizer (SGD, Nesterov momentum) and label smoothing.
OFF = [
    "scheduler=cosine",
    "model.init=[]",
    "model.bn_momentum=0.1",
    "classifier.norm_lr_scale=1",
    "classifier.flip_average=false",
]
# Per recipe: (what the row adds, its overrides on top of the row above); a row with "not kept" starts from the
# recipe itself instead.
ROWS = {
    "fashion_fast": [
        ("methods off: cosine per epoch, random flips", [*OFF, "data.flip=true"]),
        ("+ triangular schedule, stepped per batch", ["scheduler=triangular"]),
        ("+ whitening init of conv1", ["model.init=[whiten]"]),
        ("+ identity (dirac) init of conv2, conv3", ["model.init=[whiten,dirac]"]),
        ("+ batch norm lr × 8", ["classifier.norm_lr_scale=8"]),
        ("+ batch norm momentum 0.4", ["model.bn_momentum=0.4"]),
        ("+ alternating flips", ["data.flip=alternate"]),
        ("+ test-time flip averaging (= fashion_fast)", ["classifier.flip_average=true"]),
        ("not kept: + shift averaging (1 pixel)", ["classifier.shift_average=1"]),
        ("not kept: + Lookahead (every 5, α 0.5)", ["callbacks=[default,lookahead]"]),
        ("not kept: one-cycle (cos) for triangular", ["scheduler=onecycle"]),
        ("not kept: Muon for the conv filters", ["optimizer=muon", "optimizer.muon_lr=0.1"]),
    ],
    "fashion_best": [
        # fb2, fashion_best before issue 32's methods (docs/results.md), for the recipe's 30 epochs.
        (
            "fb2's methods: cosine per epoch, random flips, pooling after batch norm",
            ["scheduler=cosine", "model.init=[]", "data.flip=true", "model.pool_first=false"],
        ),
        ("+ pooling before batch norm", ["model.pool_first=true"]),
        ("+ triangular schedule, stepped per batch", ["scheduler=triangular"]),
        ("+ whitening init of conv1", ["model.init=[whiten]"]),
        ("+ identity (dirac) init of conv2, conv3", ["model.init=[whiten,dirac]"]),
        ("+ alternating flips (= fashion_best)", ["data.flip=alternate"]),
    ],
    "mnist_fast": [
        ("methods off: cosine per epoch", OFF),
        ("+ triangular schedule, stepped per batch", ["scheduler=triangular"]),
        ("+ whitening init of conv1", ["model.init=[whiten]"]),
        ("+ identity (dirac) init of conv2 (= mnist_fast)", ["model.init=[whiten,dirac]"]),
        ("not kept: + batch norm lr × 8", ["classifier.norm_lr_scale=8"]),
        ("not kept: + batch norm momentum 0.4", ["model.bn_momentum=0.4"]),
        ("not kept: + shift averaging (1 pixel)", ["classifier.shift_average=1"]),
        ("not kept: + Lookahead (every 5, α 0.5)", ["callbacks=[default,lookahead]"]),
        ("not kept: one-cycle (cos) for triangular", ["scheduler=onecycle"]),
        ("not kept: Muon for the conv filters", ["optimizer=muon", "optimizer.muon_lr=0.2"]),
    ],
}
VALIDATION = ["data.val_size=5000", "test=false", "report.enabled=false"]
# The validation accuracy whose first epoch a recipe's table shows.
BARS = {"fashion_best": 0.94}


def rows(recipe: str) -> list[tuple[str, list[str]]]:
    """Each row's label and its whole list of overrides (cumulative, or the recipe's own plus one)."""
    built, so_far = [], []
    for label, overrides in ROWS[recipe]:
        if label.startswith("not kept"):
            built.append((label, overrides))
        else:
            so_far = _merged(so_far, overrides)
            built.append((label, so_far))
    return built


def _merged(overrides: list[str], more: list[str]) -> list[str]:
    """`overrides` with each key that `more` sets replaced by its new value."""
    keys = {item.split("=", 1)[0] for item in more}
    return [item for item in overrides if item.split("=", 1)[0] not in keys] + more


def validation_accuracy(
    recipe: str, overrides: list[str], seed: int, args: argparse.Namespace
) -> tuple[float, int | None]:
    """The run's validation accuracy after its last epoch, and the first epoch whose accuracy reached the recipe's
    bar (None: none did, or the recipe has no bar)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "train.py", f"experiment={recipe}", f"seed={seed}", f"paths.data_dir={args.data_dir}",
               f"hydra.run.dir={tmp}/run", *VALIDATION, *overrides]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        final = json.loads((Path(tmp) / "run" / "metrics.json").read_text())["metrics"]["val/acc"]
        with open(Path(tmp) / "run" / "epochs.csv", newline="") as f:
            epochs = list(csv.DictReader(f))
    return final, first_epoch_at(epochs, BARS.get(recipe))


def first_epoch_at(epochs: list[dict[str, str]], bar: float | None) -> int | None:
    """The first of epochs.csv's rows whose validation accuracy is at least `bar`."""
    reached = (int(row["epoch"]) for row in epochs if bar is not None and float(row["val/acc"] or 0) >= bar)
    return next(reached, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=ROWS, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--mirror", help="dataset mirror to fill --data-dir from (as paths.data_mirror)")
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    args = parser.parse_args()
    for name in DATASETS:
        MNISTDataModule(name, data_dir=args.data_dir, mirror=args.mirror).prepare_data()
    bar = BARS.get(args.recipe)
    seeds = " | ".join(f"seed {s}" for s in args.seeds)
    reached = f" | epoch reaching {bar:.0%} ({', '.join(f'seed {s}' for s in args.seeds)})" if bar else ""
    print(f"\n`train.py experiment={args.recipe}`, validation accuracy after the last epoch\n")
    print(f"| row | overrides | {seeds} | mean | change{reached} |")
    print(f"|---|---|{'---|' * len(args.seeds)}---|---|{'---|' if bar else ''}")
    before = None
    for label, overrides in rows(args.recipe):
        runs = [validation_accuracy(args.recipe, overrides, seed, args) for seed in args.seeds]
        scores = [score for score, _ in runs]
        mean = statistics.fmean(scores)
        change = "" if before is None else f"{(mean - before) * 100:+.2f}"
        cells = " | ".join(f"{s:.2%}" for s in scores)
        epochs = f" | {', '.join('not reached' if e is None else str(e) for _, e in runs)}" if bar else ""
        print(f"| {label} | `{' '.join(overrides)}` | {cells} | {mean:.2%} | {change}{epochs} |", flush=True)
        if not label.startswith("not kept"):
            before = mean


if __name__ == "__main__":
    main()
