"""A recipe's whole command against the notebook's recipe on the same data, side by side on this machine.

    python -m benchmarks.compare --table recipes --mirror ../shared/datasets
    python -m benchmarks.compare --table recipes --recipes fashion_small --seeds 0 1 --rounds 3

Each run is `python train.py experiment=<recipe> seed=<s> paths.data_dir=<dir> hydra.run.dir=<tmp>`, as a user runs
it (training, then its test and report), in a process of its own, timed from launch to exit. Its reference is the
notebook's recipe on the recipe's dataset (`seed_mnist` or `seed_fashion`, read from the composed config), run with
the same seed and overrides. Rounds run each recipe's run beside its reference's, the pairs and the order within a
pair rotating from round to round, so drift in the machine's speed reaches both alike. A pair's ratio is
recipe / reference; the table shows the median over the pairs (rounds × seeds) and their range.

Where a command's time goes, from benchmarks/epoch_timer.py's callback: start-up (launch to the first training step:
imports, config, data, model, the sanity check), training (the first epoch's start to the end of training, its
validation and checkpoints included; the first batch's fetch, a millisecond or so, counts in both) and the rest (the
test, the report, exit). The callback's own per-step cost is Lightning's
dispatch of its six per-step hooks, measured here and printed beside the table.
"""

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.compare import ROOT, rotated
from benchmarks.epoch_timer import EpochTimer
from cnn_exp.data import MNISTDataModule
from cnn_exp.precision import native_bf16_cpu

RECIPES = ["fashion_best", "fashion_fast", "fashion_small", "mnist_fast", "mnist_small"]
# The notebook's recipe on each dataset.
REFERENCES = {"MNIST": "seed_mnist", "FashionMNIST": "seed_fashion"}
# The callback hooks Lightning calls on every training step.
STEP_HOOKS = {
    "on_train_batch_start": (None, 0),
    "on_before_backward": (None,),
    "on_after_backward": (),
    "on_before_optimizer_step": (None,),
    "on_before_zero_grad": (None,),
    "on_train_batch_end": (None, None, 0),
}


def datasets(recipes: list[str]) -> dict[str, str]:
    """Each recipe's dataset as its composed config says; one `error:` line, before anything runs, for a recipe that
    does not exist or whose dataset has no notebook recipe."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from cnn_exp.run import setup

    setup()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        known = GlobalHydra.instance().config_loader().get_group_options("experiment")
        missing = [recipe for recipe in recipes if recipe not in known]
        if missing:
            names = ", ".join(f"experiment={recipe}" for recipe in missing)
            sys.exit(f"error: no such recipe: {names} (conf/experiment/ has {', '.join(known)})")
        found = {recipe: compose("train", overrides=[f"experiment={recipe}"]).data.dataset for recipe in recipes}
    for recipe, dataset in found.items():
        if dataset not in REFERENCES:
            sys.exit(f"error: experiment={recipe} trains on {dataset}, which has no notebook recipe to compare with")
    return found


def schedule(recipes: list[str], seeds: list[int], r: int) -> list[tuple[str, int, str]]:
    """Round `r`'s runs in order: each recipe and seed beside its reference run, the pairs rotating by one place
    from round to round and the order within a pair alternating."""
    pairs = []
    for j, (recipe, seed) in enumerate((recipe, seed) for recipe in recipes for seed in seeds):
        both = [(recipe, seed, "recipe"), (recipe, seed, "reference")]
        pairs.append(both if (r + j) % 2 == 0 else both[::-1])
    return [run for pair in rotated(pairs, r) for run in pair]


def measure(experiment: str, seed: int, folder: Path, args: argparse.Namespace) -> dict:
    """One whole command, timed from launch to exit; what its run recorded, and where its time went."""
    folder.mkdir(parents=True)
    times, run_dir = folder / "times.json", folder / "run"
    cmd = [sys.executable, "train.py", f"experiment={experiment}", f"seed={seed}", f"paths.data_dir={args.data_dir}",
           f"hydra.run.dir={run_dir}", "+callbacks.epoch_timer._target_=benchmarks.epoch_timer.EpochTimer",
           f"+callbacks.epoch_timer.path={times}", *args.override]  # fmt: skip
    launched = time.time()
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    whole = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"error: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    timer = json.loads(times.read_text())
    record = json.loads((run_dir / "metrics.json").read_text())
    startup, training = timer["first_step"] - launched, sum(timer["epochs"])
    print(f"  {experiment} seed {seed}: {whole:.1f} s", file=sys.stderr)
    return {
        "whole": whole,
        "startup": startup,
        "training": training,
        "rest": whole - startup - training,
        "steps": record.get("steps"),
        "acc": record.get("metrics", {}).get("test/acc"),
        "precision": record["settings"]["precision"],
    }


def timer_cost() -> float:
    """Seconds a training step spends in Lightning's dispatch of the EpochTimer's hooks: the same hook calls with and
    without it among the Trainer's callbacks, the difference."""
    import lightning as L
    from lightning.pytorch.trainer import call

    quiet = logging.getLogger("lightning.pytorch")
    level, steps = quiet.level, 20_000
    quiet.setLevel(logging.WARNING)
    try:
        trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)  # fmt: skip
    finally:
        quiet.setLevel(level)
    timer = EpochTimer(os.devnull)
    timer.first_step = 0.0  # as after the first step
    per_step: dict[int, float] = {}
    for callbacks in ([], [timer], [], [timer]):
        trainer.callbacks[:] = callbacks
        start = time.perf_counter()
        for _ in range(steps):
            for hook, hook_args in STEP_HOOKS.items():
                call._call_callback_hooks(trainer, hook, *hook_args)
        took = (time.perf_counter() - start) / steps
        per_step[len(callbacks)] = min(per_step.get(len(callbacks), took), took)
    return max(per_step[1] - per_step[0], 0.0)


def machine() -> str:
    """The processor and cores this ran on, and the date."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    text = f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    text += f", bf16 instructions: {'yes' if native_bf16_cpu() else 'no'}"
    if torch.cuda.is_available():
        text += f", GPU: {torch.cuda.get_device_name()}"
    return f"{text}; torch {torch.__version__}; {datetime.date.today().isoformat()}"


def seconds(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def table(pairs: dict[str, list[tuple[dict, dict]]], references: dict[str, str]) -> list[str]:
    rows = [
        "| recipe | reference | precision (recipe / reference) | test acc recipe (mean of seeds; each) "
        "| test acc reference | whole command recipe s | reference s | ratio median (min–max over rounds × seeds) "
        "| start-up (recipe / reference) | training | rest |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for recipe, measured in pairs.items():
        ours, theirs = [a for a, _ in measured], [b for _, b in measured]
        ratios = [a["whole"] / b["whole"] for a, b in measured]

        def precision(runs: list[dict]) -> str:
            return ", ".join(sorted({run["precision"] for run in runs}))

        def accuracy(runs: list[dict]) -> str:
            accs = [run["acc"] for run in runs]
            if None in accs:
                return "—"
            each = f" ({', '.join(f'{acc * 100:.2f}' for acc in accs)})" if len(accs) > 1 else ""
            return f"{statistics.mean(accs) * 100:.2f} %{each}"

        phases = [f"{seconds(ours, key):.2f} / {seconds(theirs, key):.2f} s" for key in ("startup", "training", "rest")]
        rows.append(
            f"| {recipe} | {references[recipe]} | {precision(ours)} / {precision(theirs)} | {accuracy(ours)} "
            f"| {accuracy(theirs)} | {seconds(ours, 'whole'):.2f} s | {seconds(theirs, 'whole'):.2f} s "
            f"| {statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f}) | {' | '.join(phases)} |"
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare --table recipes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--table", choices=["recipes"], default="recipes", help=argparse.SUPPRESS)
    parser.add_argument("--recipes", nargs="+", default=RECIPES, help=f"experiments (default: {' '.join(RECIPES)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="each its own reference run (default: 0)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--override", nargs="*", default=[], help="extra train.py overrides, given to both")
    parser.add_argument("--mirror", help="dataset mirror to fill --data-dir from (as paths.data_mirror)")
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--keep", type=Path, help="keep each run's directory under this folder (default: removed)")
    args = parser.parse_args(argv)
    args.recipes, args.seeds = list(dict.fromkeys(args.recipes)), list(dict.fromkeys(args.seeds))
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.keep and args.keep.exists() and any(args.keep.iterdir()):
        parser.error(f"--keep {args.keep}: not empty")
    found = datasets(args.recipes)
    references = {recipe: REFERENCES[dataset] for recipe, dataset in found.items()}
    for dataset in sorted(set(found.values())):
        MNISTDataModule(dataset, data_dir=args.data_dir, mirror=args.mirror).prepare_data()

    pairs: dict[str, list[tuple[dict, dict]]] = {recipe: [] for recipe in args.recipes}
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        for r in range(args.rounds):
            print(f"round {r + 1} of {args.rounds}", file=sys.stderr)
            measured: dict[tuple[str, int, str], dict] = {}
            for recipe, seed, role in schedule(args.recipes, args.seeds, r):
                experiment = recipe if role == "recipe" else references[recipe]
                folder = base / f"round{r}-seed{seed}-{recipe}-{role}"
                measured[recipe, seed, role] = measure(experiment, seed, folder, args)
            for recipe in args.recipes:
                pairs[recipe] += [
                    (measured[recipe, seed, "recipe"], measured[recipe, seed, "reference"]) for seed in args.seeds
                ]

    runs = [run for recipe_pairs in pairs.values() for pair in recipe_pairs for run in pair]
    step = min((run["training"] / run["steps"] for run in runs if run["steps"]), default=None)
    cost = timer_cost()
    print(f"\nMachine: {machine()}\n")
    given = f", overrides: {' '.join(args.override)}" if args.override else ""
    seeds = " ".join(map(str, args.seeds))
    print(f"`train.py experiment=… seed=…` and its notebook reference, {args.rounds} round(s), seeds {seeds}{given}\n")
    print("\n".join(table(pairs, references)))
    share = f": {cost / step:.2%} of the shortest training time ÷ steps above ({step * 1000:.1f} ms)" if step else ""
    print(f"\nThe timing callback's hooks cost {cost * 1e6:.1f} µs a training step{share}.")


if __name__ == "__main__":
    main()
