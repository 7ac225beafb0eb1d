"""Sweeps (-m): one directory per job, a summary table best first, failed jobs listed, HParams in TensorBoard."""

import csv
import shutil
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cnn_exp import record
from cnn_exp.sweep import summarize, write_stopped
from tests.conftest import NO_FIGURES, QUICK, read_metrics, run, start

COLUMNS = ["job", "overrides", "val/acc", "val/loss", "test/acc", "test/loss", "epochs", "wall_time_s", "status"]


def sweep_dirs(paths: list[str]) -> list[Path]:
    log_dir = Path(next(p for p in paths if p.startswith("paths.log_dir=")).partition("=")[2])
    return sorted((log_dir / "train" / "multiruns").iterdir())


def read_summary(sweep: Path) -> list[dict[str, str]]:
    with open(sweep / "summary.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_sweep_summary_lists_every_job_with_its_own_numbers_best_first(paths: list[str]) -> None:
    proc = run("train.py", "-m", *paths, *QUICK, *NO_FIGURES, "model.padding=0,2", "optimizer.lr=0.02,0.1")
    (sweep,) = sweep_dirs(paths)
    rows = read_summary(sweep)
    assert sorted(row["job"] for row in rows) == ["0", "1", "2", "3"]
    for row in rows:
        job = Path(row["run_dir"])
        assert job.parent == sweep and job.name == row["job"]
        result = read_metrics(job)
        # The overrides this job varies; those all jobs share (paths, QUICK, NO_FIGURES) are left out.
        assert row["overrides"].split() == list(OmegaConf.load(job / ".hydra" / "overrides.yaml"))[-2:]
        assert row["status"] == "ok" and int(row["epochs"]) == result["epochs"] == 1
        for metric in ("val/acc", "val/loss", "test/acc", "test/loss"):
            assert float(row[metric]) == result["metrics"][metric]
        assert float(row["wall_time_s"]) == result["wall_time_s"]
    scores = [float(row["val/acc"]) for row in rows]
    assert scores == sorted(scores, reverse=True)
    assert {row["overrides"] for row in rows} == {
        f"model.padding={p} optimizer.lr={lr}" for p in (0, 2) for lr in (0.02, 0.1)
    }

    table = (sweep / "summary.md").read_text()
    # Printed as a table that fits the terminal: each job's swept values and scores, best first; every column in
    # summary.md. Each job showed its epochs as it ran.
    printed = [line for line in proc.stdout.splitlines() if line.startswith("│")]
    assert [line.split("│")[1].strip() for line in printed] == [row["job"] for row in rows]
    assert all(f"{float(row['val/acc']):.4f}" in line for line, row in zip(printed, rows, strict=True))
    assert all(len(line) <= 80 for line in proc.stdout.splitlines() if line.startswith(("│", "┃")))
    assert sum(line.startswith(("job 0: epoch 1/1 · train loss",)) for line in proc.stdout.splitlines()) == 1
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    # A column per swept key after the job's number (tests/test_visuals.py), then ours.
    header = ["job", "model.padding", "optimizer.lr", *COLUMNS[1:]]
    assert lines[0].startswith("| " + " | ".join(header)) and len(lines) == 1 + len(rows)
    assert [line.split(" | ")[3] for line in lines[1:]] == [row["overrides"] for row in rows]


@pytest.mark.slow
def test_a_failed_job_is_listed_the_others_run_and_the_sweep_exits_nonzero(paths: list[str]) -> None:
    # Padding 0 with 5×5 kernels makes net3's last feature map vanish (fails before training); lr 1e6 diverges.
    grid = ["model=net3", "model.kernel_size=5", "model.padding=0,2", "optimizer.lr=0.1,1e6"]
    proc = run("train.py", "-m", *paths, *QUICK, *NO_FIGURES, *grid, check=False)
    assert proc.returncode == 1 and "error: 3 of 4 jobs failed (jobs " in proc.stderr
    (sweep,) = sweep_dirs(paths)
    rows = {row["overrides"]: row for row in read_summary(sweep)}
    assert rows["model.padding=2 optimizer.lr=0.1"]["status"] == "ok"
    for lr in ("0.1", "1000000.0"):  # Hydra records 1e6 as the float it parsed
        row = rows[f"model.padding=0 optimizer.lr={lr}"]
        assert row["status"].startswith("failed: model: the feature map vanishes at conv3") and not row["val/acc"]
    assert rows["model.padding=2 optimizer.lr=1000000.0"]["status"].startswith("failed: training diverged")
    assert read_summary(sweep)[0]["overrides"] == "model.padding=2 optimizer.lr=0.1"  # the one that finished


@pytest.mark.slow
def test_sweeps_started_together_never_share_a_directory(paths: list[str]) -> None:
    command = ["-m", *paths, *QUICK, "test=false", "++trainer.limit_train_batches=2"]
    procs = [start("train.py", *command) for _ in range(2)]
    assert all(proc.wait(timeout=300) == 0 for proc in procs)
    sweeps = sweep_dirs(paths)
    assert len(sweeps) == 2 and all(read_summary(sweep)[0]["status"] == "ok" for sweep in sweeps)


@pytest.mark.slow
def test_an_optuna_search_runs_its_trials_on_validation_and_reports_the_best(paths: list[str]) -> None:
    search = ["hparams_search=optuna", "hydra.sweeper.n_trials=2", "data.val_size=200", "trainer.max_epochs=1"]
    run("train.py", "-m", *paths, *search)
    (sweep,) = sweep_dirs(paths)
    rows = read_summary(sweep)
    assert len(rows) == 2 and all(row["status"] == "ok" for row in rows)
    assert all(row["test/acc"] == "" for row in rows)  # trials are compared on validation only
    assert all("optimizer.lr=" in row["overrides"] for row in rows)  # each trial drew its own values
    # A column for every key of the search space, though Optuna writes no multirun.yaml to read them from.
    assert {"optimizer", "optimizer.lr", "model.padding", "data.batch_size"} <= set(rows[0])
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == max(float(row["val/acc"]) for row in rows) == float(rows[0]["val/acc"])


@pytest.mark.slow
def test_an_optuna_search_whose_every_trial_fails_still_leaves_its_table(paths: list[str]) -> None:
    search = ["hparams_search=mnist_optuna", "hydra.sweeper.n_trials=2", "model.kernel_size=40"]
    proc = run("train.py", "-m", *paths, *search, check=False)
    assert proc.returncode != 0  # Optuna's own error: no trial completed
    (sweep,) = sweep_dirs(paths)
    rows = read_summary(sweep)
    assert len(rows) == 2 and all(row["status"].startswith("failed: model: the feature map vanishes") for row in rows)


def test_a_sweep_directory_with_a_link_leading_out_is_refused(paths: list[str], tmp_path: Path) -> None:
    """Hydra writes multirun.yaml in the sweep directory by its name: through a link it would write elsewhere."""
    precious, sweep = tmp_path / "precious.yaml", tmp_path / "sweep"
    precious.write_text("keep me")
    sweep.mkdir()
    (sweep / "multirun.yaml").symlink_to(precious)
    proc = run("train.py", "-m", *paths, f"hydra.sweep.dir={sweep}", "seed=0,1", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {sweep / 'multirun.yaml'} is a link to {precious}")
    assert precious.read_text() == "keep me" and sorted(p.name for p in sweep.iterdir()) == ["multirun.yaml"]


def test_an_optuna_search_without_a_validation_split_is_refused_before_its_trials(paths: list[str]) -> None:
    """Each trial returns val/acc for the search to maximize: with data.val_size=0 there is none to return."""
    search = ["hparams_search=optuna", "hydra.sweeper.n_trials=1", "data.val_size=0"]
    proc = run("train.py", "-m", *paths, *search, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: the search maximizes val/acc, but data.val_size=0 leaves no validation split to measure it on: set "
        "data.val_size (e.g. 5000)"
    ]
    log_dir = Path(next(p for p in paths if p.startswith("paths.log_dir=")).partition("=")[2])
    assert not (log_dir / "train" / "multiruns").exists()  # no sweep directory, no trial


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_parallel_launchers_run_every_job(launcher: str, paths: list[str]) -> None:
    # Torch's own number of threads, as for a user: the joblib launcher must lower it itself.
    overrides = ["-m", *paths, *QUICK, *NO_FIGURES, f"hydra/launcher={launcher}", "model.padding=0,1"]
    run("train.py", *overrides, one_thread=False)
    (sweep,) = sweep_dirs(paths)
    rows = read_summary(sweep)
    assert sorted(row["overrides"] for row in rows) == ["model.padding=0", "model.padding=1"]
    assert all(row["status"] == "ok" and float(row["val/acc"]) > 0 for row in rows)
    if launcher == "joblib":  # parallel jobs split the cores instead of each taking them all
        threads = {read_metrics(Path(row["run_dir"]))["settings"]["threads"] for row in rows}
        assert threads == {1}  # joblib's default n_jobs=-1 runs one job per core


def test_the_summary_names_how_each_job_ended_and_sorts_by_any_metric(tmp_path: Path) -> None:
    results = {
        "0": {"status": "finished", "metrics": {"val/loss": 0.5, "val/acc": 0.8, "train/loss": 0.4, "test/acc": 0.7}},
        "1": {"status": "finished", "metrics": {"val/loss": 0.3, "val/acc": 0.9, "train/loss": 0.6, "test/acc": 0.6}},
        "2": {"status": "running"},  # killed with the sweep
        "3": {"status": "interrupted"},
        "4": None,  # stopped before writing metrics.json
    }
    for job, result in results.items():
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
        if result:
            record.write(tmp_path / job, result)
    rows, metric = summarize(tmp_path, "train/loss")
    assert metric == "train/loss" and [row["job"] for row in rows][:2] == ["0", "1"]  # lower loss first
    assert [row["status"] for row in rows][2:] == [
        "running",
        "interrupted",
        "failed: no metrics.json (stopped before training started)",
    ]
    assert [row["job"] for row in summarize(tmp_path, "val/acc")[0]][:2] == ["1", "0"]
    # A metric no job has (a test.py sweep has only test metrics): the rows are sorted by test/acc instead.
    rows, metric = summarize(tmp_path, "val/f1")
    assert metric == "test/acc" and [row["job"] for row in rows] == ["0", "1", "2", "3", "4"]
    # No job has either (a search whose every trial failed): the sweep's own metric stays named.
    for job in ("0", "1"):
        record.write(tmp_path / job, {"status": "failed", "error": "diverged"})
    assert summarize(tmp_path, "val/acc")[1] == "val/acc"


def test_a_test_py_sweep_over_checkpoints_is_summarized_and_fails_for_a_missing_one(
    trained: Path, data_dir: Path, tmp_path: Path
) -> None:
    good, missing = trained / "checkpoints" / "last.ckpt", tmp_path / "missing.ckpt"
    sweep = [f"ckpt_path={good},{missing}", f"paths.data_dir={data_dir}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = run("test.py", "-m", *sweep, check=False)
    assert proc.returncode == 1
    rows = {row["overrides"]: row for row in read_summary(tmp_path / "sweep")}
    assert rows[f"ckpt_path={good}"]["status"] == "ok" and float(rows[f"ckpt_path={good}"]["test/acc"]) > 0.2
    assert rows[f"ckpt_path={missing}"]["status"].startswith("failed: ckpt_path=")


@pytest.mark.slow
def test_a_new_sweep_never_replaces_one(paths: list[str], tmp_path: Path) -> None:
    """Into a sweep directory that holds a sweep's runs, a second sweep is refused whole before Hydra writes there:
    its jobs would be refused in the old jobs' directories, and the summary would list the old runs as its own."""
    sweep = tmp_path / "sweep"
    command = ["-m", *paths, *QUICK, *NO_FIGURES, "test=false", "++trainer.limit_train_batches=2", "seed=0,1"]
    run("train.py", *command, f"hydra.sweep.dir={sweep}")
    before = {path: path.read_bytes() for path in sweep.rglob("*") if path.is_file() and path.name != ".lock"}
    proc = run("train.py", *command, "optimizer.lr=0.5", f"hydra.sweep.dir={sweep}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {sweep} already holds a sweep's runs (jobs 0, 1): choose another hydra.sweep.dir "
        "(a new sweep never replaces one)"
    )
    after = {path: path.read_bytes() for path in sweep.rglob("*") if path.is_file() and path.name != ".lock"}
    assert after == before  # multirun.yaml, the jobs' records and the summary as they were


@pytest.mark.slow
def test_a_sweep_directory_in_use_or_holding_a_run_is_refused(paths: list[str], trained: Path, tmp_path: Path) -> None:
    """A second sweep started into the directory of one still going is refused whole (their jobs would be refused
    in each other's directories, each summary listing the other's); so is a sweep into a run's directory, and a run
    into a sweep's: either would replace the other's summary and report."""
    sweep = tmp_path / "sweep"
    command = ["-m", *paths, *QUICK, *NO_FIGURES, "test=false"]
    first = start("train.py", *command, "seed=0,1,2,3", f"hydra.sweep.dir={sweep}")
    deadline = time.monotonic() + 120
    while not (sweep / "multirun.yaml").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc = run("train.py", *command, "optimizer.lr=0.5", f"hydra.sweep.dir={sweep}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {sweep} is in use by another process (a sweep or run still going): wait for it to end, or choose "
        "another hydra.sweep.dir"
    )
    assert first.wait(timeout=300) == 0
    assert sorted(row["overrides"] for row in read_summary(sweep)) == [f"seed={s}" for s in range(4)]

    proc = run("train.py", *paths, *QUICK, f"hydra.run.dir={sweep}", check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        f"error: {sweep} already holds a sweep: choose another hydra.run.dir (a new run never replaces one)"
    )
    assert not record.path(sweep).exists()

    copy = shutil.copytree(trained, tmp_path / "run", symlinks=True)
    before = {path: path.read_bytes() for path in copy.rglob("*") if path.is_file() and path.name != ".lock"}
    proc = run("train.py", *command, "seed=0,1", f"hydra.sweep.dir={copy}", check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        f"error: {copy} already holds a run: choose another hydra.sweep.dir (a new sweep never replaces one)"
    )
    after = {path: path.read_bytes() for path in copy.rglob("*") if path.is_file() and path.name != ".lock"}
    assert after == before


@pytest.mark.slow
@pytest.mark.parametrize("when", ["after a job's last test batch", "between two jobs"])
def test_a_signal_outside_a_jobs_training_stops_the_sweep_with_its_summary(
    when: str, paths: list[str], tmp_path: Path
) -> None:
    """A SIGTERM while a job draws its test report (its training done), or between two jobs, stops the sweep before
    its next job, as one during training does: exit 143, the summary listing the jobs it did not run."""
    sweep = tmp_path / "sweep"
    if when.startswith("after"):
        signal_at = "+callbacks.kill._target_=tests.callbacks.SignalAfterTest"
    else:
        signal_at = "+hydra.callbacks.kill._target_=tests.callbacks.SignalAfterFirstJob"
    command = ["-m", *paths, *QUICK, *NO_FIGURES, "++trainer.limit_train_batches=2", "seed=0,1,2", signal_at]
    proc = run("train.py", *command, f"hydra.sweep.dir={sweep}", check=False)
    assert proc.returncode == 143 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    rows = read_summary(sweep)
    assert [(row["job"], row["seed"], row["status"]) for row in rows] == [
        ("0", "0", "ok"),
        ("-", "1", "not run: the sweep was stopped"),
        ("-", "2", "not run: the sweep was stopped"),
    ]
    assert not (sweep / "1").exists()  # the job it stopped before leaves no directory
    assert "SIGTERM: the sweep stops before this job" in proc.stderr

    if when == "between two jobs":  # a second signal stops it at once, as the system would
        proc = run(
            "train.py", *command, "+hydra.callbacks.kill.times=2", f"hydra.sweep.dir={tmp_path / 'twice'}", check=False
        )
        assert proc.returncode == -15 and not (tmp_path / "twice" / "1").exists()


@pytest.mark.slow
def test_jobs_below_the_sweep_directory_at_any_depth_are_summarized(paths: list[str], tmp_path: Path) -> None:
    """hydra.sweep.subdir may put the jobs deeper than one level: each is still listed, and a failed one fails the
    sweep."""
    sweep = tmp_path / "sweep"
    command = ["-m", *paths, *QUICK, *NO_FIGURES, "++trainer.limit_train_batches=2", "optimizer.lr=0.1,1e6"]
    subdir = "hydra.sweep.subdir=lr${optimizer.lr}/${hydra.job.num}"
    proc = run("train.py", *command, subdir, f"hydra.sweep.dir={sweep}", check=False)
    assert proc.returncode == 1 and "error: 1 of 2 jobs failed (jobs lr1000000.0/1)" in proc.stderr
    rows = {row["job"]: row for row in read_summary(sweep)}
    assert rows["lr0.1/0"]["status"] == "ok" and rows["lr1000000.0/1"]["status"].startswith("failed: training diverged")
    proc = run("train.py", *command, f"hydra.sweep.dir={sweep}", check=False)
    assert proc.returncode == 1 and "already holds a sweep's runs (jobs lr0.1/0, lr1000000.0/1)" in proc.stderr


def test_a_stopped_sweep_of_a_groups_glob_lists_the_jobs_it_ran(tmp_path: Path) -> None:
    """Hydra expands glob(...) of a config group's options only with its config loader: the summary of a stopped
    sweep lists the jobs that ran, as for an Optuna search, rather than failing the job that stops it."""
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    (tmp_path / "0" / ".hydra" / "overrides.yaml").write_text("- model=net2\n")
    record.write(tmp_path / "0", {"status": "interrupted", "signal": "SIGTERM"})
    hydra = {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"}}
    OmegaConf.save({"hydra": hydra | {"overrides": {"task": ["model=glob(net*)"]}}}, tmp_path / "multirun.yaml")
    write_stopped(tmp_path, "val/acc")
    assert [(row["job"], row["status"]) for row in read_summary(tmp_path)] == [("0", "interrupted by SIGTERM")]
