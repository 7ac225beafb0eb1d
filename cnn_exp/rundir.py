"""A run directory belongs to one run, worked in by one process at a time.

The lock is taken when Hydra resolves where the run's own record of its config goes (`hydra.output_subdir`): that
is after Hydra has chosen the directory and before it writes anything there, so a second process started on the
same directory never overwrites the first one's record. It is an flock (through `filelock`): the kernel drops it
when its process dies, however it dies, so a stale lock of a killed run is simply taken over.
"""

import os
from pathlib import Path

from filelock import FileLock, Timeout
from lightning.fabric.plugins.environments import SLURMEnvironment

from cnn_exp import record
from cnn_exp.errors import UserError

LOCK = ".lock"
# The locks this process holds, by resolved directory; None where another process held it.
_held: dict[Path, FileLock | None] = {}
# Directories whose lock could not even be created, with the reason.
_unwritable: dict[Path, str] = {}


def claim(run_dir: str | Path) -> bool:
    """Take the directory's lock for this process without waiting (again: no-op); False if another process has it,
    or if its lock file is not a plain file (`lock_problem`)."""
    key = Path(run_dir).resolve()
    if _held.get(key) is None:
        key.mkdir(parents=True, exist_ok=True)
        if lock_problem(key):
            return False
        lock = FileLock(key / LOCK)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            lock = None
        except OSError as err:  # a directory this process cannot write in (read-only, immutable)
            _unwritable[key], lock = err.strerror or str(err), None
        _held[key] = lock
    return _held[key] is not None


def lock_problem(run_dir: str | Path) -> str | None:
    """What is wrong with a lock file this project did not make: filelock opens it for writing and truncates it, so a
    link would empty the file it points to, and a FIFO would block. None for a plain file, or none yet."""
    lock = Path(run_dir) / LOCK
    if lock.is_symlink():
        return f"{lock} is a link, not a lock file: delete the link (a run's lock is a plain file it makes itself)"
    if lock.exists() and not lock.is_file():
        return f"{lock} is not a plain file: remove it (a run's lock is a plain file it makes itself)"
    if (reason := _unwritable.get(Path(run_dir).resolve())) is not None:
        return f"cannot write {lock} ({reason}): give the run a directory it can write to (hydra.run.dir=...)"
    return None


def holds_lock(run_dir: str | Path) -> bool:
    """Whether this process holds the directory's lock (claimed it, and has not released it)."""
    return _held.get(Path(run_dir).resolve()) is not None


def release(run_dir: str | Path) -> None:
    """Let the directory go: the job of a sweep ends, the next one runs in the same process."""
    lock = _held.pop(Path(run_dir).resolve(), None)
    if lock is not None:
        lock.release()


def check_claimed(run_dir: str | Path) -> None:
    """Refuse to work in a directory another process is working in (a second train.py, or a second resume=)."""
    if not claim(run_dir):
        if problem := lock_problem(run_dir):
            raise UserError(problem)
        raise UserError(
            f"{run_dir} is in use by another process (a run, or a resume= of it, still going): wait for it to end, "
            "or choose another directory"
        )


def holds_a_run(run_dir: str | Path) -> bool:
    """Whether a run already lives here: its record (of train.py or test.py), or checkpoints of one."""
    checkpoints = Path(run_dir) / "checkpoints"
    held = record.path(run_dir).exists() or record.path(run_dir).is_symlink()
    return held or (checkpoints.is_dir() and any(checkpoints.glob("*.ckpt")))


def check_new(run_dir: str | Path, task: str) -> None:
    """Refuse to start a new run of `task` (train, test) in a directory that already holds one: a new run never
    replaces one, and a test's record would replace a training run's (its settings, its status, its resume)."""
    if holds_a_run(run_dir):
        instead = f", or continue an unfinished one with resume={run_dir}" if task == "train" else ""
        raise UserError(
            f"{run_dir} already holds a run: choose another hydra.run.dir (a new run never replaces one){instead}"
        )


def requeued() -> bool:
    """Whether this process is a SLURM job that SLURM started again (after a preemption or a requeue)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def slurm_job() -> str | None:
    """This SLURM job's id as scontrol names it (an array task's, `<array job>_<task>`, for job arrays) when Lightning
    sees a SLURM job, else None. Its directory (resume.py) and its requeue (signals.py) are named by it."""
    if not SLURMEnvironment.detect():
        return None
    if array := os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID")
