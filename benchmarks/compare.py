"""Epoch time of our train.py path against the notebook's loop, a bare in-memory loop and that loop inside an
otherwise empty Lightning Trainer (Lightning's own cost), on this machine.

    python -m benchmarks.compare --mirror ../shared/datasets               # the three paths, side by side
    python -m benchmarks.compare --mirror ../shared/datasets --precision bf16-mixed   # all but the notebook's in bf16
    python -m benchmarks.compare --mirror ../shared/datasets --table scaling   # vs batch size, network width
    python -m benchmarks.compare --device cuda --override trainer=gpu --table options   # bf16, compile, NHWC
    python -m benchmarks.compare --mirror ../shared/datasets --table fashion_best   # its step: pool_first, bf16
    python -m benchmarks.compare --mirror ../shared/datasets --table extras   # what each of ours adds per step
    python -m benchmarks.compare --mirror ../shared/datasets --table recipes   # whole commands vs the notebook's
    python -m benchmarks.compare --mirror ../shared/datasets --pinned --variants "Lightning, bare step, NHWC" train.py

Every measurement is its own process. Rounds interleave the variants, rotating their order, so drift in the
machine's speed reaches all of them alike. A process reports the median of its epochs after the first (warm-up);
the tables show the median over rounds, and each ratio is the median of the per-round ratios. "start → step 1" is
the time from launching the process to its first training step. With --pinned the two variants run at once instead,
each on a CPU of its own with one thread, swapping them each round: drift reaches both in the same seconds.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cnn_exp.data import DATASETS, MNISTDataModule
from cnn_exp.precision import BF16, FP32, native_bf16_cpu

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "Network2 / MNIST": {"model": "net2", "data": "mnist", "experiment": "seed_mnist", "batch": 100},
    "Network3 / Fashion": {"model": "net3", "data": "fashion", "experiment": "seed_fashion", "batch": 40},
}
# Each loop variant: its benchmarks/loops.py loop, and whether it uses the NHWC memory format our configs use.
LOOPS = {"notebook": ("notebook", False), "bare": ("bare", False), "bare NHWC": ("bare", True),
         "Lightning, bare step, NHWC": ("lightning", True)}  # fmt: skip
VARIANTS = [*LOOPS, "train.py"]
RATIOS = [("train.py", "notebook"), ("bare NHWC", "notebook"), ("Lightning, bare step, NHWC", "notebook"),
          ("train.py", "bare"), ("train.py", "bare NHWC"), ("Lightning, bare step, NHWC", "bare NHWC"),
          ("train.py", "Lightning, bare step, NHWC")]  # fmt: skip
TRAIN_IMAGES = 60_000
CORES = sorted(os.sched_getaffinity(0))[:2]  # the two cores --pinned runs on: the first two this process may use


def command(variant: str, case: dict, args: argparse.Namespace, out: Path, extra: list[str]) -> list[str]:
    if variant in LOOPS:
        loop, channels_last = LOOPS[variant]
        options = ["--model", case["model"], "--data", case["data"], "--batch-size", str(case["batch"])]
        options += ["--channels-last"] if channels_last else []
        options += ["--precision", args.precision] if args.precision and loop != "notebook" else []
        return [sys.executable, "-m", "benchmarks.loops", loop, *options, "--epochs", str(args.epochs),
                "--data-dir", args.data_dir, "--device", args.device]  # fmt: skip
    # As users run it: the experiment's Trainer, DataModule, logger, checkpoints and callbacks, plus a timer.
    precision = [f"trainer.precision={args.precision}"] if args.precision else []
    return [sys.executable, "train.py", f"experiment={case['experiment']}", f"trainer.max_epochs={args.epochs}",
            "test=false", f"paths.data_dir={args.data_dir}", f"hydra.run.dir={out.parent / 'run'}",
            "+callbacks.epoch_timer._target_=benchmarks.epoch_timer.EpochTimer",
            f"+callbacks.epoch_timer.path={out}", *precision, *extra]  # fmt: skip


def rotated(items: list, r: int) -> list:
    """Round `r`'s order: `items` rotated by `r` places, so that drift in the machine's speed reaches each alike."""
    return items[r % len(items) :] + items[: r % len(items)]


def measure(cmd: list[str], out: Path, device: str) -> dict:
    return measure_together([(cmd, out)], device)[0]


def measure_together(jobs: list[tuple[list[str], Path]], device: str, cores: list[int] | None = None) -> list[dict]:
    """Run each (command, times file) job and read its times; with `cores`, all at once, the i-th pinned to cores[i]
    with one thread (torch's threads follow OMP_NUM_THREADS). Output goes to files: a pipe left unread while another
    job is waited for would stall its writer. A failed job stops the others."""
    launched = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if cores else None
    procs: list[subprocess.Popen] = []
    try:
        for (cmd, out), core in zip(jobs, cores or [None] * len(jobs), strict=True):
            with open(f"{out}.stdout", "w") as stdout, open(f"{out}.stderr", "w") as stderr:
                pin = [] if core is None else ["taskset", "--cpu-list", str(core)]
                procs.append(subprocess.Popen([*pin, *cmd], cwd=ROOT, stdout=stdout, stderr=stderr, env=env))
        while any(proc.poll() is None for proc in procs) and not any(proc.poll() for proc in procs):
            time.sleep(0.1)
        for (cmd, out), proc in zip(jobs, procs, strict=True):
            if proc.poll():
                sys.exit(f"{' '.join(cmd)} failed:\n{Path(f'{out}.stderr').read_text()[-3000:]}")
        results = []
        for _, out in jobs:
            printed = Path(f"{out}.stdout").read_text()
            result = json.loads(out.read_text() if out.exists() else printed.strip().splitlines()[-1])
            results.append(
                {
                    "epoch": statistics.median(result["epochs"][1:]),
                    "startup": result["first_step"] - launched,
                    "device": result.get("data_device", device),  # the loops hold their data where they train
                }
            )
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def compare(args: argparse.Namespace) -> None:
    for name, case in CASES.items():
        if case["data"] not in args.cases:
            continue
        variants = [v for v in VARIANTS if v in args.variants]
        results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
        for r in range(args.rounds):
            if args.pinned:  # both at once, each on its own core, which they swap each round
                with tempfile.TemporaryDirectory() as tmp:
                    outs = [Path(tmp) / f"{i}.json" for i in range(2)]
                    jobs = [
                        (command(v, case, args, out, args.override), out) for v, out in zip(variants, outs, strict=True)
                    ]
                    measured = measure_together(jobs, args.device, [CORES[r % 2], CORES[1 - r % 2]])
                    for variant, result in zip(variants, measured, strict=True):
                        results[variant].append(result)
                continue
            for variant in rotated(variants, r):
                with tempfile.TemporaryDirectory() as tmp:
                    out = Path(tmp) / "times.json"
                    results[variant].append(measure(command(variant, case, args, out, args.override), out, args.device))
        how = "at once, pinned, one thread each" if args.pinned else args.device
        precision = f"{args.precision}, the notebook's fp32" if args.precision else "fp32, train.py as configured"
        print(f"\n{name}, batch {case['batch']}, {args.rounds} rounds of {args.epochs} epochs ({how}; {precision})\n")
        print("| path | epoch time | images/s | start → step 1 | data on |\n|---|---|---|---|---|")
        for variant, runs in results.items():
            epoch = statistics.median(r["epoch"] for r in runs)
            startup = statistics.median(r["startup"] for r in runs)
            print(
                f"| {variant} | {epoch:.2f} s | {TRAIN_IMAGES / epoch:,.0f} | {startup:.1f} s | {runs[0]['device']} |"
            )
        for a, b in [(a, b) for a, b in RATIOS if a in results and b in results]:
            ratios = [x["epoch"] / y["epoch"] for x, y in zip(results[a], results[b], strict=True)]
            spread = f" ({min(ratios):.2f}–{max(ratios):.2f} over rounds)" if len(ratios) > 1 else ""
            print(f"\n{a} / {b}: {statistics.median(ratios):.2f}{spread}", end="")
        print()


TABLES = {
    "scaling": [(f"batch {b}", [f"data.batch_size={b}"]) for b in (10, 40, 100, 500)]
    + [(f"width ×{w}", [f"model.channels=[{6 * w},{12 * w}]"]) for w in (1, 2, 4)],
    "options": [
        ("as configured (NHWC, fp32)", []),
        ("NCHW", ["model.channels_last=false"]),
        ("bf16-mixed", ["trainer.precision=bf16-mixed"]),
        ("compile", ["model.compile=true"]),
        ("bf16-mixed + compile", ["trainer.precision=bf16-mixed", "model.compile=true"]),
    ],
    "fashion_best": [
        ("fp32", ["trainer.precision=32-true"]),
        ("fp32, pool_first", ["trainer.precision=32-true", "model.pool_first=true"]),
        ("bf16-mixed", ["trainer.precision=bf16-mixed"]),
        ("bf16-mixed, pool_first", ["trainer.precision=bf16-mixed", "model.pool_first=true"]),
    ],
    # What each of ours adds to Lightning's loop, per step: Network3 / Fashion at batch 40, the notebook's recipe.
    "extras": [
        ("as configured", []),
        # Lightning's own no-op profiler, whose profile() makes a context per call, for ours (cnn_exp/assemble.py).
        ("Lightning's no-op profiler", ["++trainer.profiler._target_=lightning.pytorch.profilers.PassThroughProfiler"]),
        ("no step checkpoints", ["~callbacks.step_checkpoint"]),
        ("no progress bar", ["~callbacks.progress_bar", "++trainer.enable_progress_bar=false"]),
        ("no logger", ["~logger"]),
        (
            "none of ours: no callbacks, logger, checkpoints",
            [
                "callbacks=none",
                "~callbacks.model_checkpoint",
                "~logger",
                "++trainer.enable_progress_bar=false",
                "++trainer.enable_checkpointing=false",
                "++trainer.enable_model_summary=false",
            ],
        ),
    ],
}
# fashion_best's epochs are long: its table times 150 training steps an epoch (batch 128), not all 469. Its epoch
# still holds what every epoch does (its checkpoint, the epoch table), alike in every row.
STEPS = 150


def table(args: argparse.Namespace) -> None:
    """Our path under each row's overrides, one process each: Network2 / MNIST, or fashion_best's own recipe."""
    if args.table == "fashion_best":
        case = {"experiment": "fashion_best"}
        limits = [f"++trainer.limit_train_batches={STEPS}", "++trainer.limit_val_batches=2"]
        title, columns = f"train.py experiment=fashion_best, {STEPS} steps an epoch", f"epoch ÷ {STEPS}, ms"
    elif args.table == "extras":
        case, limits = CASES["Network3 / Fashion"], []
        title, columns = "train.py experiment=seed_fashion (Network3, batch 40)", "µs a step"
    else:
        case, limits = CASES["Network2 / MNIST"], []
        title, columns = "train.py, Network2 / MNIST, batch 100 unless named", "images/s"
    print(f"\n{title} ({args.device}), median of epochs 2-{args.epochs}\n")
    rows = TABLES[args.table]
    if limits and args.device == "cpu" and not native_bf16_cpu():  # emulated, its epochs take minutes
        rows = [(label, overrides) for label, overrides in rows if "bf16" not in label]
        print("(bf16 rows left out: this CPU has no bf16 instructions)\n")
    print(f"| setting | epoch time | {columns} | ÷ first row, per round: median (range) | data on |")
    print("|---|---|---|---|---|")
    results: dict[str, list[dict]] = {label: [] for label, _ in rows}
    for r in range(args.rounds):
        for label, overrides in rotated(rows, r):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "times.json"
                cmd = command("train.py", case, args, out, overrides + limits + args.override)
                results[label].append(measure(cmd, out, args.device))
    for label, runs in results.items():
        epoch = statistics.median(run["epoch"] for run in runs)
        if limits:
            speed = f"{epoch / STEPS * 1000:.0f}"
        elif args.table == "extras":
            speed = f"{epoch / (TRAIN_IMAGES / case['batch']) * 1e6:.0f}"
        else:
            speed = f"{TRAIN_IMAGES / epoch:,.0f}"
        # Per round, against the first row's run of that round: drift between rounds cancels out.
        ratios = [run["epoch"] / first["epoch"] for run, first in zip(runs, results[rows[0][0]], strict=True)]
        ratio = f"{statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f})"
        print(f"| {label} | {epoch:.2f} s | {speed} | {ratio} | {runs[0]['device']} |")


def main() -> None:
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--table")
    if first.parse_known_args()[0].table == "recipes":  # its own arguments: benchmarks/recipes.py
        from benchmarks import recipes

        return recipes.main()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mirror", help="dataset mirror to fill --data-dir from (as paths.data_mirror)")
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--rounds", type=int, help="3; 4 with --pinned, which needs an even number")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--cases", nargs="+", default=["mnist", "fashion"], choices=["mnist", "fashion"])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS, help="the paths to time")
    tables = "instead: our path under each of a table's settings; recipes: see --table recipes --help"
    parser.add_argument("--table", choices=[*TABLES, "recipes"], help=tables)
    precision = "train.py's trainer.precision and the bare and Lightning loops' (default: 32-true and as configured)"
    parser.add_argument("--precision", choices=[FP32, BF16], help=precision + "; the notebook's loop stays fp32")
    parser.add_argument("--override", nargs="*", default=[], help="extra train.py overrides, e.g. trainer=gpu")
    pinned = "run the two --variants at once, each on a CPU of its own with one thread, swapping them each round"
    parser.add_argument("--pinned", action="store_true", help=pinned)
    args = parser.parse_args()
    if args.pinned and (len(set(args.variants)) != 2 or args.table or args.device != "cpu" or len(CORES) < 2):
        parser.error("--pinned times two --variants on the CPU, with two cores or more for this process")
    args.rounds = args.rounds or (4 if args.pinned else 3)
    if args.pinned and args.rounds % 2:
        parser.error("--pinned swaps the cores each round: give an even number of --rounds")
    if args.precision and args.table:
        parser.error("--precision is for the paths side by side; a --table sets each row's own (or use --override)")
    if args.precision == BF16 and args.device == "cpu" and not native_bf16_cpu():
        print("note: this CPU has no bf16 instructions: bf16 is emulated here, and slow", file=sys.stderr)
    for name in DATASETS:
        MNISTDataModule(name, data_dir=args.data_dir, mirror=args.mirror).prepare_data()
    table(args) if args.table else compare(args)


if __name__ == "__main__":
    main()
