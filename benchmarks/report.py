"""What the lab report costs a run: each part timed on a finished run's directory and its network, in one process.

    python -m benchmarks.report RUN_DIR [--rounds 5]

A default run (`python train.py`: 10 epochs) writes the report 13 times (at the start, after each epoch, after its
test, at the end), draws the network once and the three pictures of inside the network once. Each part is timed
`--rounds` times and its median printed, then the total a default run spends on them.
"""

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import cnn_exp
from cnn_exp import inside, netdraw, report
from cnn_exp.plots import pixels

WRITES = 13  # report.write calls in a default 10-epoch run


def median_seconds(work: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run of train.py")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    predictor = cnn_exp.load(args.run_dir / "checkpoints" / "last.ckpt")
    net = predictor.model.net
    torch.manual_seed(0)
    images = torch.randn(8, *net.input_shape)
    labels = torch.randint(0, net.num_classes, (8,))
    wrong = (labels + 1) % net.num_classes
    classes = predictor.classes
    parts = {
        "report.write (html + md)": lambda: report.write(args.run_dir),
        "network picture and arithmetic": lambda: (pixels(netdraw.network_figure(net)), netdraw.size_arithmetic(net)),
        "filters picture": lambda: pixels(inside.filters_figure(net)),
        "feature maps picture (3 images)": lambda: pixels(inside.feature_maps_figure(net, images, labels, classes)),
        "saliency picture (6 images)": lambda: pixels(inside.saliency_figure(net, images, labels, wrong, classes)),
    }
    timed = {name: median_seconds(work, args.rounds) for name, work in parts.items()}
    for name, seconds in timed.items():
        print(f"{name:36s} {seconds * 1000:8.1f} ms")
    writes = timed["report.write (html + md)"] * WRITES
    total = writes + sum(seconds for name, seconds in timed.items() if not name.startswith("report.write"))
    print(f"a default run: {WRITES} writes {writes:.2f} s + pictures once = {total:.2f} s")


if __name__ == "__main__":
    main()
