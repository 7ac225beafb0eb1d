"""What schedulers and terminals do to a run, done for real: SIGTERM, SIGINT, SLURM's requeue signal, a kill during
the final test, a second process in the same run directory."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from cnn_exp import checkpoints, record
from cnn_exp import run as cnn_run
from cnn_exp.signals import Interrupted, StopOnSignal
from tests.conftest import MIRROR, NO_FIGURES, read_metrics, run, run_here, start

pytestmark = pytest.mark.slow

# 800 training images in batches of 50: 16 steps an epoch; dropout, shifts and flips draw random numbers every step.
RUN = [
    "data=fashion",
    "data.shift=2",
    "data.flip=true",
    "model.dropout=0.3",
    "data.val_size=200",
    "data.batch_size=50",
    "trainer.max_epochs=2",
    "seed=5",
    "callbacks.step_checkpoint.every_n_train_steps=5",
    *NO_FIGURES,
]


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict:
    """The metrics of the run never stopped, which every stopped and continued run must end with."""
    run_dir = tmp_path_factory.mktemp("whole")
    run("train.py", f"paths.data_dir={data_dir}", f"paths.data_mirror={MIRROR}", f"hydra.run.dir={run_dir}", *RUN)
    return read_metrics(run_dir)


def signal_at(step: int, name: str) -> list[str]:
    return [
        "+callbacks.stop._target_=tests.callbacks.SignalAt",
        f"+callbacks.stop.step={step}",
        f"+callbacks.stop.signal={name}",
    ]


# As step 7 begins: that batch finishes, then the state is saved. As step 15, an epoch's last batch, begins: its
# validation and epoch-end checkpoint come first, and the next batch (Lightning's own handler ended the run there
# with exit status 0).
@pytest.mark.parametrize("step, saved", [(7, 8), (15, 17)])
def test_sigterm_saves_the_exact_state_exits_143_and_resume_ends_as_if_never_stopped(
    paths: list[str], tmp_path: Path, whole: dict, step: int, saved: int
) -> None:
    report = ["report.enabled=true"]  # what it says of the stopped run (NO_FIGURES turns it off)
    proc = run("train.py", *paths, *RUN, *report, *signal_at(step, "SIGTERM"), f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 143
    assert proc.stderr.strip().splitlines()[-1] == (
        f"SIGTERM: stopped, the training state is saved. Continue with: python train.py resume={tmp_path}"
    )
    stopped = read_metrics(tmp_path)
    assert stopped["status"] == "interrupted" and stopped["signal"] == "SIGTERM" and "metrics" not in stopped
    assert stopped["steps"] == saved == checkpoints.load(tmp_path / "checkpoints" / "step.ckpt")["global_step"]
    # Its report says so first, with the command that continues it.
    assert (
        f"**status: interrupted** (SIGTERM) · `python train.py resume={tmp_path}`"
        in (tmp_path / "report.md").read_text()
    )
    run("train.py", f"resume={tmp_path}")
    resumed = read_metrics(tmp_path)
    assert resumed["status"] == "finished" and resumed["metrics"] == whole["metrics"]
    assert "**status: finished**" in (tmp_path / "report.md").read_text() and resumed["resumes"]


def test_ctrl_c_exits_130_with_the_state_saved(paths: list[str], tmp_path: Path) -> None:
    proc = run("train.py", *paths, *RUN, *signal_at(20, "SIGINT"), f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 130 and f"python train.py resume={tmp_path}" in proc.stderr
    assert read_metrics(tmp_path)["signal"] == "SIGINT"
    assert checkpoints.load(tmp_path / "checkpoints" / "step.ckpt")["global_step"] == 21


def test_a_run_killed_in_its_final_test_is_finished_by_resume_with_the_same_test(
    paths: list[str], tmp_path: Path, whole: dict
) -> None:
    kill = ["+callbacks.kill._target_=tests.callbacks.SignalInTest", f"+callbacks.kill.once={tmp_path / 'killed'}"]
    run_dir = tmp_path / "run"
    assert run("train.py", *paths, *RUN, *kill, f"hydra.run.dir={run_dir}", check=False).returncode == -9
    assert read_metrics(run_dir)["status"] == "running"
    run("train.py", f"resume={run_dir}")
    resumed = read_metrics(run_dir)
    assert resumed["status"] == "finished" and resumed["metrics"] == whole["metrics"]
    assert Path(resumed["tested"]).name == Path(whole["tested"]).name  # the checkpoint the run would have tested


def test_a_sigterm_stops_a_sweep_and_its_summary_lists_the_jobs_never_run(paths: list[str]) -> None:
    proc = run("train.py", "-m", *paths, *RUN, *signal_at(3, "SIGTERM"), "optimizer.lr=0.05,0.1,0.2", check=False)
    assert proc.returncode == 143
    log_dir = Path(next(p for p in paths if p.startswith("paths.log_dir=")).partition("=")[2])
    (sweep,) = (log_dir / "train" / "multiruns").iterdir()
    table = (sweep / "summary.md").read_text()
    assert proc.stdout.count("not run: the sweep was stopped") == table.count("not run: the sweep was stopped") >= 1
    rows = [line for line in table.splitlines() if line.startswith("| ") and "overrides" not in line]
    assert len(rows) == 3
    assert "interrupted by SIGTERM" in rows[0] and "optimizer.lr=0.05" in rows[0]
    assert all("not run: the sweep was stopped" in row for row in rows[1:])
    # The swept key's column, though the one job that ran had one value of it; then the overrides.
    assert [row.split(" | ")[1:3] for row in rows[1:]] == [["0.1", "optimizer.lr=0.1"], ["0.2", "optimizer.lr=0.2"]]


def slurm_job(tmp_path: Path, job: str) -> dict[str, str]:
    """The environment of a simulated SLURM job: its variables, and a stand-in scontrol on PATH that records each
    call in tmp_path/scontrol.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": job, "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}  # fmt: skip
    return os.environ | slurm | {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_a_slurm_job_requeued_on_its_signal_continues_its_own_run(tmp_path: Path, data_dir: Path, whole: dict) -> None:
    """SLURM simulated: its variables, its requeue signal (SIGUSR1), and a stand-in scontrol that records the call."""
    env = slurm_job(tmp_path, "4242")
    command = [f"paths.data_dir={data_dir}", f"paths.data_mirror={MIRROR}", f"paths.log_dir={tmp_path / 'outputs'}",
               *RUN, *signal_at(7, "SIGUSR1")]  # fmt: skip
    first = run("train.py", *command, env=env, check=False)
    assert first.returncode == 128 + signal.SIGUSR1, first.stderr[-2000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    run_dir = tmp_path / "outputs" / "train" / "runs" / "slurm-4242"
    stopped = read_metrics(run_dir)
    assert stopped["status"] == "interrupted" and stopped["requeued"] and stopped["steps"] == 8
    # SLURM starts the same command again, with the same job id.
    run("train.py", *command, env=env | {"SLURM_RESTART_COUNT": "1"})
    resumed = read_metrics(run_dir)
    assert resumed["status"] == "finished" and resumed["metrics"] == whole["metrics"]
    assert len(list((run_dir / ".hydra").glob("resumed-*"))) == 1


def test_one_process_per_run_directory_and_a_new_run_never_replaces_one(
    paths: list[str], tmp_path: Path, trained: Path
) -> None:
    """train.py, resume= and test.py alike: refused while another process works in the directory, refused in one
    that holds a run, and a refused process adds nothing to it (no Hydra record, no log lines)."""
    run_dir = tmp_path / "run"
    checkpoint = trained / "checkpoints" / "last.ckpt"
    seconds = [
        ("train.py", f"hydra.run.dir={run_dir}", *RUN),
        ("train.py", f"resume={run_dir}", *RUN),
        ("test.py", f"hydra.run.dir={run_dir}", f"ckpt_path={checkpoint}"),
        ("test.py", f"hydra.run.dir={run_dir}", f"ckpt_path={checkpoint}", f"predict={MIRROR}"),
    ]
    first = start("train.py", *paths, *RUN, "trainer.max_epochs=1000", f"hydra.run.dir={run_dir}")
    try:
        while read_status(run_dir) != "running":  # waits on the file, not on time
            assert first.poll() is None, first.stderr_path.read_text()
            time.sleep(0.1)
        started = (run_dir / ".hydra" / "config.yaml").read_text()
        for script, *second in seconds:
            proc = run(script, *paths, *second, check=False)
            assert proc.returncode == 1 and f"error: {run_dir} is in use by another process" in proc.stderr
        assert (run_dir / ".hydra" / "config.yaml").read_text() == started
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=300) == 143
    finally:
        first.kill()
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file() and path.name != ".lock"}
    for script, *second in [seconds[0], *seconds[2:]]:
        proc = run(script, *paths, *second, check=False)
        assert proc.returncode == 1 and f"error: {run_dir} already holds a run" in proc.stderr, proc.stderr
    after = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file() and path.name != ".lock"}
    assert after == before  # metrics.json, .hydra/, train.log: nothing added, nothing changed
    assert read_status(run_dir) == "interrupted"
    run("train.py", *paths, f"resume={run_dir}", "trainer.max_epochs=1000", check=False)  # still continues


def read_status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "metrics.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return None


def test_a_run_averaging_its_weights_tests_and_resumes_with_the_average(paths: list[str], tmp_path: Path) -> None:
    ema = ["callbacks=[default,ema]", "callbacks.ema.decay=0.8"]
    whole_dir = tmp_path / "whole"
    run("train.py", *paths, *RUN, *ema, f"hydra.run.dir={whole_dir}")
    whole = read_metrics(whole_dir)
    best = checkpoints.load(whole["tested"])
    average, current = best["state_dict"], best["current_model_state"]
    assert any(not torch.equal(average[name], current[name]) for name in average)  # the file holds the average...
    tested = tmp_path / "tested"
    run("test.py", *paths, f"ckpt_path={whole['tested']}", f"hydra.run.dir={tested}")
    # ...and the run's own test used it, as test.py does (Lightning's callback put the raw weights back for it).
    assert read_metrics(tested)["metrics"] == {k: v for k, v in whole["metrics"].items() if k.startswith("test/")}

    stopped = tmp_path / "stopped"
    proc = run("train.py", *paths, *RUN, *ema, *signal_at(7, "SIGTERM"), f"hydra.run.dir={stopped}", check=False)
    assert proc.returncode == 143
    run("train.py", f"resume={stopped}")
    assert read_metrics(stopped)["metrics"] == whole["metrics"]


@pytest.mark.parametrize("slurm", [False, True], ids=["resume", "slurm-requeue"])
def test_a_run_stopped_while_it_starts_starts_again_from_the_beginning(
    tmp_path: Path, data_dir: Path, whole: dict, slurm: bool
) -> None:
    """A real signal while the run sets up its data, before its first step: nothing to save, so `resume=` (or SLURM's
    requeue, on its own signal) starts it again and it ends as a run never stopped."""
    env = slurm_job(tmp_path, "77") if slurm else dict(os.environ)
    stop = [
        "+callbacks.stop._target_=tests.callbacks.SignalAtStart",
        f"+callbacks.stop.once={tmp_path / 'once'}",
        f"+callbacks.stop.signal={'SIGUSR1' if slurm else 'SIGTERM'}",
    ]
    command = [f"paths.data_dir={data_dir}", f"paths.data_mirror={MIRROR}", f"paths.log_dir={tmp_path / 'outputs'}",
               *RUN, *stop]  # fmt: skip
    if not slurm:
        command.append(f"hydra.run.dir={tmp_path / 'run'}")
    first = run("train.py", *command, env=env, check=False)
    run_dir = tmp_path / ("outputs/train/runs/slurm-77" if slurm else "run")
    stopped = read_metrics(run_dir)
    assert stopped["status"] == "interrupted" and stopped["steps"] == 0
    assert not list((run_dir / "checkpoints").glob("*.ckpt"))
    if slurm:
        assert first.returncode == 128 + signal.SIGUSR1, first.stderr[-2000:]
        assert (tmp_path / "scontrol.log").read_text() == "requeue 77\n" and stopped["requeued"]
        assert "SLURM requeued the job, it starts again" in first.stderr
        again = run("train.py", *command, env=env | {"SLURM_RESTART_COUNT": "1"})
    else:
        assert first.returncode == 143, first.stderr[-2000:]
        assert first.stderr.strip().splitlines()[-1] == (
            f"SIGTERM: stopped before anything was saved. Start it again with: python train.py resume={run_dir}"
        )
        # config.yaml is a copy to read: an edit of it is not what resume= continues with, and the user is told.
        written = (run_dir / "config.yaml").read_text()
        (run_dir / "config.yaml").write_text(written.replace("max_epochs: 2", "max_epochs: 99"))
        again = run("train.py", f"resume={run_dir}", env=env)
        assert f"warning: {run_dir / 'config.yaml'} was edited since the run wrote it" in again.stdout + again.stderr
        (edited,) = run_dir.glob("config.edited-*.yaml")
        assert "max_epochs: 99" in edited.read_text() and "max_epochs: 99" not in (run_dir / "config.yaml").read_text()
    assert "starts again from the beginning" in (run_dir / "train.log").read_text(), again.stderr[-2000:]
    assert read_metrics(run_dir)["status"] == "finished"
    assert read_metrics(run_dir)["metrics"] == whole["metrics"]


def _deliver(signum: int) -> None:
    """Send this process a real signal and give Python the moment to run its handler."""
    os.kill(os.getpid(), signum)
    time.sleep(0.05)


def test_a_second_signal_stops_at_once_without_calling_the_run_finished(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stopper = StopOnSignal(tmp_path)
    with pytest.raises(Interrupted), stopper.handling():
        stopper.running = True  # training: the first signal waits for the batch in hand
        _deliver(signal.SIGTERM)
        assert stopper.received == signal.SIGTERM
        _deliver(signal.SIGTERM)  # the second stops at once
    assert "came after the last batch" not in caplog.text


def test_a_signal_while_the_record_is_written_waits_for_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A record half-written because a signal came would go on saying the run is running."""
    stopper, written = StopOnSignal(tmp_path), []
    with stopper.handling(), stopper.deferred():  # not training: without it, a signal stops at once
        _deliver(signal.SIGTERM)
        written.append("the record")
    assert written == ["the record"]
    assert "SIGTERM came after the last batch: the run has finished" in caplog.text


def test_a_second_signal_while_a_stopped_run_writes_its_record_leaves_it_whole(
    paths: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real SIGTERM stops the run at step 3; a second comes as train.py writes the record of the stop: the record
    says interrupted, with where to resume from, not running."""
    write = cnn_run._write_record

    def write_signalled(*args: object) -> None:
        if args[-1]["status"] != record.RUNNING:  # the record of the stop
            _deliver(signal.SIGTERM)
        write(*args)

    monkeypatch.setattr(cnn_run, "_write_record", write_signalled)
    with pytest.raises(SystemExit) as stopped:
        run_here("train.py", tmp_path, *paths, *RUN, *signal_at(3, "SIGTERM"))
    assert stopped.value.code == 143
    result = read_metrics(tmp_path)
    assert result["status"] == "interrupted" and result["resume"] == f"python train.py resume={tmp_path}"
