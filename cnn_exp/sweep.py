"""The results of a sweep: one row per job, best first, from each job's metrics.json, with a column per swept key;
a picture of the optimized metric against the swept keys; and, when the jobs differ by seed, mean ± std over seeds.
"""

import csv
import functools
import logging
import os
import signal
import statistics
import sys
from pathlib import Path
from typing import Any

# Private to Hydra: no public API expands a sweep's overrides into its jobs (`_planned`); this is what Hydra's own
# basic sweeper runs (tests/test_lightning_privates.py checks it is still there).
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from rich.table import Table
from rich.text import Text

from cnn_exp import atomic, record, report, rundir, signals
from cnn_exp.errors import shown
from cnn_exp.plots import pixels, side_by_side, sweep_figure, write_png

log = logging.getLogger(__name__)

# The metrics the summary shows, its columns in this order.
METRICS = [record.VAL_ACC, record.VAL_LOSS, record.TEST_ACC, record.TEST_LOSS]
# Besides these, summary.csv has one column per swept key, after "job".
COLUMNS = ["job", "overrides", *METRICS, "epochs", "wall_time_s", "status", "run_dir"]
# How a sweep tells its jobs which keys it varies (set in the sweep's process, inherited by every job).
SWEPT_KEYS = "CNN_EXP_SWEPT_KEYS"


def summarize(sweep_dir: Path, metric: str = record.OPTIMIZED) -> tuple[list[dict[str, Any]], str]:
    """Rows for every job directory of a sweep, sorted by `metric` (by test/acc when no job has `metric` and some
    have that), failures last.

    A job's overrides come from Hydra's own record of them, so a job that failed before writing anything is
    listed too; the overrides all jobs share are left out. Returns the rows and the metric they were sorted by.
    """
    jobs = job_dirs(sweep_dir)
    overrides = {job: list(OmegaConf.load(job / ".hydra" / "overrides.yaml")) for job in jobs}
    # The overrides every job shares (paths, fixed settings) would repeat on each row: a row shows what it varies,
    # and every key the sweep varies, even where the jobs that ran so far share its value (a stopped sweep).
    varied = _recorded_varied_keys(sweep_dir)
    common = set.intersection(*map(set, overrides.values())) if len(jobs) > 1 or (jobs and varied) else set()
    common = {o for o in common if split_override(o)[0] not in varied}
    rows, scores = [], {}
    for job in jobs:
        result = record.read(job) or {}
        # A metric that was not a finite number (a diverged loss) is recorded as null: it ranks as missing.
        metrics = {name: value for name, value in result.get("metrics", {}).items() if value is not None}
        name = job.relative_to(sweep_dir).as_posix()
        scores[name] = metrics
        rows.append(
            {
                "job": name,
                "overrides": " ".join(o for o in overrides[job] if o not in common),
                **{name: metrics.get(name) for name in METRICS},
                "epochs": result.get("epochs"),
                "wall_time_s": result.get("wall_time_s"),
                "status": _status(result),
                "run_dir": str(job),
            }
        )
    if not any(metric in metrics for metrics in scores.values()) and any(record.TEST_ACC in m for m in scores.values()):
        metric = record.TEST_ACC  # jobs without a validation split: sorted by what they were tested on
    swept = _swept_values(overrides.values(), common, varied)
    rows = [_with_keys(row, values) for row, values in zip(rows, swept, strict=True)]
    sign = 1 if metric.endswith("loss") else -1  # best first
    rows.sort(key=lambda row: (metric not in scores[row["job"]], sign * scores[row["job"]].get(metric, 0)))
    return rows, metric


def job_dirs(sweep_dir: Path) -> list[Path]:
    """A sweep's job directories (those holding Hydra's record of a job's overrides), in job order: one level below
    it by default, deeper where hydra.sweep.subdir says so (lr${optimizer.lr}/${hydra.job.num}). A job's own
    folders are not searched, nor links."""
    found = []
    for root, folders, _ in os.walk(sweep_dir):
        here = Path(root)
        if here != sweep_dir and (here / ".hydra" / "overrides.yaml").is_file():
            found.append(here)
            folders.clear()
        folders[:] = [name for name in folders if not name.startswith(".")]
    return sorted(found, key=lambda job: [_number(part) for part in job.relative_to(sweep_dir).parts])


def _swept_values(jobs: Any, common: set[str], varied: list[str]) -> list[dict[str, str]]:
    """Each job's value of every key the sweep varies (`varied`) and of every other key that not all jobs set alike:
    "" where a job leaves it at its default. A lone job of a sweep that varies nothing varies nothing."""
    values = [dict(split_override(o) for o in overrides if o not in common) for overrides in jobs]
    if len(values) < 2 and not varied:
        return [{} for _ in values]
    keys = list(dict.fromkeys([*varied, *(key for job in values for key in job)]))
    return [{key: job.get(key, "") for key in keys} for job in values]


def _recorded_varied_keys(sweep_dir: Path) -> list[str]:
    """The keys the sweep varies, from Hydra's record of it (multirun.yaml), or in the sweep's own process from what
    it found as it started (an Optuna search writes no multirun.yaml); [] where neither says."""
    try:
        return varied_keys(OmegaConf.load(sweep_dir / "multirun.yaml"))
    except Exception:  # no record (a summary of job folders alone, an Optuna search), or one that is not Hydra's
        return _running.get(sweep_dir.resolve(), [])


# The sweep this process runs: its directory and the keys it varies (SweepSummary.on_multirun_start).
_running: dict[Path, list[str]] = {}


@functools.cache  # a summary is rewritten after every job, from every job's overrides: each is parsed once
def split_override(override: str) -> tuple[str, str]:
    """An override's config key and its value as given, as Hydra's own parser reads it: `+model.dropout=0.5` →
    ("model.dropout", "0.5"), `++a@pkg='x=y'` → ("a", "'x=y'"). A deletion (`~key`) has the value "~", which no
    value can be.

    Every module that needs an override's key or value takes them from here.
    """
    try:
        parsed = OverridesParser.create().parse_override(override)
    except HydraException:  # not one Hydra took (a hand-edited overrides.yaml): its key is before the first "="
        key, _, value = override.partition("=")
        return key.lstrip("+~"), value
    return parsed.key_or_group, "~" if parsed.is_delete() else parsed.get_value_string()


def _with_keys(row: dict[str, Any], swept: dict[str, str]) -> dict[str, Any]:
    """The row with the swept keys' columns after "job"; a key named like a column of ours keeps ours."""
    return {"job": row["job"], **{k: v for k, v in swept.items() if k not in row}, **row}


def swept_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The swept keys' columns of summarize's rows."""
    return [column for column in rows[0] if column not in COLUMNS] if rows else []


def write(sweep_dir: Path, rows: list[dict[str, Any]], metric: str) -> str:
    """Write summary.csv, summary.md and summary.png into the sweep directory, and seeds.csv when the jobs differ
    by seed; return the Markdown text (the tables)."""
    columns = list(rows[0]) if rows else COLUMNS
    # Each file is replaced whole: parallel jobs (joblib) may rewrite them at the same moment.
    with atomic.replace(sweep_dir / "summary.csv", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    text = f"Sweep {sweep_dir}: {len(rows)} jobs, best {metric} first\n\n" + _markdown(rows, columns)
    keys = swept_keys(rows)
    if "seed" in keys:
        groups = seed_table(rows, metric)
        with atomic.replace(sweep_dir / "seeds.csv", newline="") as f:
            writer = csv.DictWriter(f, list(groups[0]) if groups else ["jobs"])
            writer.writeheader()
            writer.writerows(groups)
        shown = [{**g, **{m: _mean_std(g[f"{m} mean"], g[f"{m} std"]) for m in METRICS}} for g in groups]
        shown = [{k: v for k, v in g.items() if not k.endswith((" mean", " std"))} for g in shown]
        text += f"\nOver seeds: mean ± sample std of each setting's finished jobs, best {metric} first\n\n"
        text += _markdown(shown, list(shown[0]) if shown else ["jobs"])
    atomic.write_text(sweep_dir / "summary.md", text)
    fixed = fixed_overrides(sweep_dir)
    _picture(sweep_dir / "summary.png", rows, keys, metric, fixed)
    report.write_sweep(sweep_dir, rows, metric, keys, seed_table(rows, metric) if "seed" in keys else [], fixed)
    return text


def fixed_overrides(sweep_dir: Path) -> list[str]:
    """The overrides every job of the sweep was given alike (the settings it held fixed), where they write left out."""
    jobs = [job / ".hydra" / "overrides.yaml" for job in job_dirs(sweep_dir)]
    if not jobs:
        return []
    common = set.intersection(*(set(OmegaConf.load(job)) for job in jobs))
    return sorted(o for o in common if not split_override(o)[0].startswith(("paths.", "hydra.")))


def seed_table(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """One row per setting (the swept keys but seed): its seeds, and the mean and sample standard deviation of each
    metric over its finished jobs (std empty for one job), best `metric` first."""
    settings = [key for key in swept_keys(rows) if key != "seed"]
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] == "ok":
            groups.setdefault(tuple(row[key] for key in settings), []).append(row)
    table = []
    for setting, jobs in groups.items():
        entry: dict[str, Any] = dict(zip(settings, setting, strict=True))
        entry["jobs"] = len(jobs)
        entry["seeds"] = " ".join(sorted((str(job["seed"]) for job in jobs), key=_value))
        for name in METRICS:
            scores = [job[name] for job in jobs if job[name] is not None]
            entry[f"{name} mean"] = statistics.fmean(scores) if scores else None
            entry[f"{name} std"] = statistics.stdev(scores) if len(scores) > 1 else None
        table.append(entry)
    sign = 1 if metric.endswith("loss") else -1
    table.sort(key=lambda g: (g.get(f"{metric} mean") is None, sign * (g.get(f"{metric} mean") or 0)))
    return table


def _picture(path: Path, rows: list[dict[str, Any]], keys: list[str], metric: str, fixed: list[str]) -> None:
    """summary.png: `metric` of the finished jobs against the swept keys, and beside it their test accuracy (when they
    were tested), averaged over seeds when seed is swept; titled with the settings the sweep held fixed."""
    settings = [key for key in keys if key != "seed"] or keys
    over = ", mean over seeds" if "seed" in keys and settings != keys else ""
    drawn = []
    for name in dict.fromkeys([metric, record.TEST_ACC]):
        done = [row for row in rows if row["status"] == "ok" and row.get(name) is not None]
        if not done or not settings:
            continue
        values = {key: [_value(row[key]) for row in done] for key in settings}
        title = f"{name} of {len(done)} finished jobs{over}" + (f"\n{' '.join(fixed)}" if fixed else "")
        drawn.append(pixels(sweep_figure(values, [row[name] for row in done], name, title)))
    if drawn:
        write_png(side_by_side(*drawn) if len(drawn) == 2 else drawn[0], path)


def _value(text: str) -> Any:
    """An override's value as a number where it is one, so the picture orders 0.05 before 0.1 before 1."""
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def _markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = [f"| {' | '.join(columns)} |", f"|{'---|' * len(columns)}"]
    for row in rows:
        cells = (_cell(row[column], column in METRICS and isinstance(row[column], float)) for column in columns)
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def _mean_std(mean: float | None, std: float | None) -> str:
    if mean is None:
        return ""
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}"


def varied_keys(config: DictConfig) -> list[str]:
    """The keys a sweep varies: those given as a list, range or interval on the command line or in the sweeper's
    params (Optuna's search space), in that order. A job sees only its own values: SweepSummary and JobLines hand
    these on to it."""
    params = config.hydra.sweeper.get("params") or {}
    given = [*config.hydra.overrides.task, *(f"{key}={value}" for key, value in params.items())]
    parsed = OverridesParser.create().parse_overrides(given)
    return list(dict.fromkeys(o.key_or_group for o in parsed if o.is_sweep_override()))


def running_sweep_keys() -> list[str] | None:
    """In a sweep's job: the keys the sweep varies (None when no sweep told, e.g. without SweepSummary)."""
    if HydraConfig.get().mode != RunMode.MULTIRUN or SWEPT_KEYS not in os.environ:
        return None
    return [key for key in os.environ[SWEPT_KEYS].split(",") if key]


class SweepSummary(Callback):
    """Hydra callback: at the end of every multirun, write and print the summary; exit 1 if any job failed.

    The files are also rewritten after each job, so a long sweep can be followed as it runs, and a sweep that
    ends in an error of its own (an Optuna search whose every trial failed) still leaves its table behind.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # A search maximizes what each trial returns: a validation metric, which a run without a validation split
        # never has (every trial would "succeed" with nothing, and the search end in Optuna's traceback).
        metric, searched = str(config.get("optimized_metric") or ""), OmegaConf.select(config, "hydra.sweeper.params")
        searching = "optuna" in str(OmegaConf.select(config, "hydra.sweeper._target_") or "").lower()
        unsplit = OmegaConf.select(config, "data.val_size") == 0 and "data.val_size" not in (searched or {})
        if searching and metric.startswith("val/") and unsplit:
            sys.exit(
                f"error: the search maximizes {metric}, but data.val_size=0 leaves no validation split to measure it "
                "on: set data.val_size (e.g. 5000)"
            )
        # A new sweep never replaces one: its jobs would be refused in the old jobs' directories, and the summary
        # would list the old runs as this sweep's. Refused before Hydra writes anything (multirun.yaml included).
        # Nor does it share its directory with a sweep or run still going (two sweeps' jobs would be refused in each
        # other's directories, each summary listing the other's): its lock is held while the sweep runs.
        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir") or ""))
        if str(sweep_dir) not in ("", "."):
            if sweep_dir.is_dir() and (problem := rundir.outside_link(sweep_dir)):  # Hydra writes multirun.yaml there
                sys.exit(f"error: {problem}")
            try:
                claimed = rundir.claim(sweep_dir)
            except OSError as err:  # a file there, or on the way there
                sys.exit(f"error: hydra.sweep.dir={sweep_dir} cannot be a directory: {err.strerror or err}")
            if not claimed:
                in_use = f"{sweep_dir} is in use by another process (a sweep or run still going): wait for it to end"
                sys.exit(f"error: {rundir.lock_problem(sweep_dir) or in_use + ', or choose another hydra.sweep.dir'}")
            if taken := [job.relative_to(sweep_dir).as_posix() for job in job_dirs(sweep_dir)]:
                sys.exit(
                    f"error: {sweep_dir} already holds a sweep's runs (jobs {', '.join(taken)}): choose another "
                    "hydra.sweep.dir (a new sweep never replaces one)"
                )
            if rundir.holds_a_run(sweep_dir):
                held = "a sweep" if rundir.holds_a_sweep(sweep_dir) else "a run"
                sys.exit(
                    f"error: {sweep_dir} already holds {held}: choose another hydra.sweep.dir (a new sweep never "
                    "replaces one)"
                )
        # Run names and TensorBoard's HParams need to know which keys vary (read back by running_sweep_keys).
        keys = varied_keys(config)
        os.environ[SWEPT_KEYS] = ",".join(keys)
        if str(sweep_dir) not in ("", "."):
            _running[sweep_dir.resolve()] = keys
        # Jobs run in this process: a signal between them stops the sweep at the next one, with its summary. (Other
        # launchers run them in processes of their own, which stop as a single run does: docs/sweeps.md.)
        if str(OmegaConf.select(config, "hydra.launcher._target_") or "").endswith(".BasicLauncher"):
            signals.hold_between_jobs()

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN and Path(config.hydra.sweep.dir).is_dir():
            sweep_dir = Path(config.hydra.sweep.dir)
            write(sweep_dir, *summarize(sweep_dir, config.get("optimized_metric") or record.OPTIMIZED))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if (signum := signals.stop_holding()) is not None:
            log.warning("%s came after the last job: the sweep has finished", signal.Signals(signum).name)
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows, metric = summarize(sweep_dir, config.get("optimized_metric") or record.OPTIMIZED)
        write(sweep_dir, rows, metric)
        sweep_table(rows, metric, swept_keys(rows), sweep_dir)
        failed = [row["job"] for row in rows if row["status"] != "ok"]
        if failed:
            sys.exit(f"error: {len(failed)} of {len(rows)} jobs failed (jobs {', '.join(failed)}): see summary.md")


def sweep_table(rows: list[dict[str, Any]], metric: str, keys: list[str], sweep_dir: Path) -> None:
    """A sweep's jobs, best first, as a table that fits the terminal: the swept keys, the optimized metric and the
    test accuracy, how each ended; summary.md holds every column, report.html the rest."""
    from cnn_exp.console import get, show  # imported here: console.py imports this module

    get().quiet = False  # a sweep stopped by a signal ends inside a job, whose output was kept off the console

    table = Table()
    table.add_column("job", justify="right")
    for key in keys:
        table.add_column(key, overflow="fold")
    for name in dict.fromkeys([metric, record.TEST_ACC]):
        table.add_column(name, justify="right")
    table.add_column("status", overflow="fold")
    for row in rows:
        scores = [
            f"{row[name]:.4f}" if row.get(name) is not None else "" for name in dict.fromkeys([metric, record.TEST_ACC])
        ]
        table.add_row(str(row["job"]), *(Text(str(row.get(key, ""))) for key in keys), *scores, Text(row["status"]))
    heading = Text(f"sweep {sweep_dir}: {len(rows)} jobs, best {metric} first")
    show(
        heading,
        table,
        Text(f"every column: {sweep_dir / 'summary.md'}; the sweep's report: {sweep_dir / 'report.html'}"),
    )


def _number(name: str) -> tuple[int, str]:
    """A job folder's name as it sorts: Hydra's job numbers in order, other names after them."""
    return (int(name), "") if name.isdigit() else (sys.maxsize, name)


def _status(result: dict[str, Any]) -> str:
    """ok, or how the job ended: failed with its error's last line, interrupted, or running (killed with the sweep)."""
    if not result:
        return "failed: no metrics.json (stopped before training started)"
    if result["status"] == record.FINISHED:
        return "ok"
    if result.get("signal"):
        return f"{result['status']} by {result['signal']}"
    error = result.get("error", "").strip().splitlines()
    return f"{result['status']}: {shown(error[-1])}" if error else result["status"]


def _cell(value: Any, metric: bool) -> str:
    if metric and value is not None:
        return f"{value:.4f}"
    return "" if value is None else shown(value, limit=100_000).replace("|", "\\|")


def write_stopped(sweep_dir: Path, metric: str) -> None:
    """A sweep stopped by a signal: print and write the summary of the jobs it ran, and of those it never started."""
    rows, metric = summarize(sweep_dir, metric)
    ran = [sorted(OmegaConf.load(Path(row["run_dir"]) / ".hydra" / "overrides.yaml")) for row in rows]
    planned = _planned(sweep_dir)
    common = set.intersection(*map(set, planned)) if len(planned) > 1 else set()
    for overrides in planned:
        if sorted(overrides) not in ran:
            missing = dict.fromkeys(rows[0] if rows else COLUMNS, None)
            missing |= {key: value for key, value in map(split_override, overrides) if key in missing}
            missing |= {"job": "-", "overrides": " ".join(o for o in overrides if o not in common), "run_dir": ""}
            rows.append(missing | {"status": "not run: the sweep was stopped"})
    write(sweep_dir, rows, metric)
    sweep_table(rows, metric, swept_keys(rows), sweep_dir)


def _planned(sweep_dir: Path) -> list[list[str]]:
    """Every job's overrides, as Hydra's basic sweeper expands the sweep it saved in multirun.yaml; [] for another
    sweeper (an Optuna search chooses its trials as it goes)."""
    try:
        hydra = OmegaConf.load(sweep_dir / "multirun.yaml").hydra
        if not str(hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return []
        # As the basic sweeper combines them: its params (a config's sweep) first, then the command line's.
        params = [f"{key}={value}" for key, value in (hydra.sweeper.get("params") or {}).items()]
        overrides = OverridesParser.create().parse_overrides([*params, *hydra.overrides.task])
        return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
    except Exception:  # no record of the sweep, one Hydra cannot read, or one it expands only with its config loader
        return []  # (glob(...) of a config group's options): list only the jobs that ran
