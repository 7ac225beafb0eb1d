"""The table at the end of a sweep: one row per job, best first, from each job's metrics.json."""

import csv
import sys
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cnn_exp import atomic, record

METRICS = ["val/acc", "val/loss", "test/acc", "test/loss"]
COLUMNS = ["job", "overrides", *METRICS, "epochs", "wall_time_s", "status", "run_dir"]


def summarize(sweep_dir: Path, metric: str = "val/acc") -> tuple[list[dict[str, Any]], str]:
    """Rows for every job directory of a sweep, sorted by `metric` (test/acc when no job has it), failures last.

    A job's overrides come from Hydra's own record of them, so a job that failed before writing anything is
    listed too; the overrides all jobs share are left out. Returns the rows and the metric they were sorted by.
    """
    jobs = sorted((p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()), key=_number)
    overrides = {job: list(OmegaConf.load(job / ".hydra" / "overrides.yaml")) for job in jobs}
    # The overrides every job shares (paths, fixed settings) would repeat on each row: a row shows what it varies.
    common = set.intersection(*map(set, overrides.values())) if len(jobs) > 1 else set()
    rows, scores = [], {}
    for job in jobs:
        result = record.read(job) or {}
        # A metric that was not a finite number (a diverged loss) is recorded as null: it ranks as missing.
        metrics = {name: value for name, value in result.get("metrics", {}).items() if value is not None}
        scores[job.name] = metrics
        rows.append(
            {
                "job": job.name,
                "overrides": " ".join(o for o in overrides[job] if o not in common),
                **{name: metrics.get(name) for name in METRICS},
                "epochs": result.get("epochs"),
                "wall_time_s": result.get("wall_time_s"),
                "status": _status(result),
                "run_dir": str(job),
            }
        )
    if not any(metric in metrics for metrics in scores.values()):
        metric = "test/acc"
    sign = 1 if metric.endswith("loss") else -1  # best first
    rows.sort(key=lambda row: (metric not in scores[row["job"]], sign * scores[row["job"]].get(metric, 0)))
    return rows, metric


def write(sweep_dir: Path, rows: list[dict[str, Any]], metric: str) -> str:
    """Write summary.csv and summary.md into the sweep directory; return the Markdown table."""
    # Each file is replaced whole: parallel jobs (joblib) may rewrite them at the same moment.
    with atomic.replace(sweep_dir / "summary.csv", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"| {' | '.join(COLUMNS)} |", f"|{'---|' * len(COLUMNS)}"]
    lines += [f"| {' | '.join(_cell(row[column], column in METRICS) for column in COLUMNS)} |" for row in rows]
    table = f"Sweep {sweep_dir}: {len(rows)} jobs, best {metric} first\n\n" + "\n".join(lines) + "\n"
    atomic.write_text(sweep_dir / "summary.md", table)
    return table


class SweepSummary(Callback):
    """Hydra callback: at the end of every multirun, write and print the summary; exit 1 if any job failed.

    The files are also rewritten after each job, so a long sweep can be followed as it runs, and a sweep that
    ends in an error of its own (an Optuna search whose every trial failed) still leaves its table behind.
    """

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN and Path(config.hydra.sweep.dir).is_dir():
            sweep_dir = Path(config.hydra.sweep.dir)
            write(sweep_dir, *summarize(sweep_dir, config.get("optimized_metric") or "val/acc"))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows, metric = summarize(sweep_dir, config.get("optimized_metric") or "val/acc")
        print(write(sweep_dir, rows, metric))
        failed = [row["job"] for row in rows if row["status"] != "ok"]
        if failed:
            sys.exit(f"error: {len(failed)} of {len(rows)} jobs failed (jobs {', '.join(failed)}): see summary.md")


def _number(job: Path) -> tuple[int, str]:
    return (int(job.name), "") if job.name.isdigit() else (sys.maxsize, job.name)


def _status(result: dict[str, Any]) -> str:
    """ok, or how the job ended: failed with its error's last line, interrupted, or running (killed with the sweep)."""
    if not result:
        return "failed: no metrics.json (stopped before training started)"
    if result["status"] == record.FINISHED:
        return "ok"
    if result.get("signal"):
        return f"{result['status']} by {result['signal']}"
    error = result.get("error", "").strip().splitlines()
    return f"{result['status']}: {error[-1]}" if error else result["status"]


def _cell(value: Any, metric: bool) -> str:
    if metric and value is not None:
        return f"{value:.4f}"
    return "" if value is None else str(value).replace("|", "\\|")


def write_stopped(sweep_dir: Path, metric: str) -> None:
    """A sweep stopped by a signal: print and write the summary of the jobs it ran, and of those it never started."""
    rows, metric = summarize(sweep_dir, metric)
    ran = [sorted(OmegaConf.load(Path(row["run_dir"]) / ".hydra" / "overrides.yaml")) for row in rows]
    planned = _planned(sweep_dir)
    common = set.intersection(*map(set, planned)) if len(planned) > 1 else set()
    for overrides in planned:
        if sorted(overrides) not in ran:
            missing = dict.fromkeys(COLUMNS, None)
            missing |= {"job": "-", "overrides": " ".join(o for o in overrides if o not in common), "run_dir": ""}
            rows.append(missing | {"status": "not run: the sweep was stopped"})
    print(write(sweep_dir, rows, metric))


def _planned(sweep_dir: Path) -> list[list[str]]:
    """Every job's overrides, as Hydra's basic sweeper expands the sweep it saved in multirun.yaml; [] for another
    sweeper (an Optuna search chooses its trials as it goes)."""
    try:
        hydra = OmegaConf.load(sweep_dir / "multirun.yaml").hydra
        if not str(hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return []
        overrides = OverridesParser.create().parse_overrides(list(hydra.overrides.task))
    except Exception:  # no record of the sweep, or one Hydra cannot read: list only the jobs that ran
        return []
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
