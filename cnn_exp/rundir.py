"""A run directory belongs to one run, worked in by one process at a time.

The directory is chosen, and how this process enters it decided (new, resumed, refused), by the resolvers that
Hydra calls for hydra.run.dir, hydra.output_subdir and the log file (`register_resolvers`). The lock is taken then:
after Hydra has chosen the directory and before it writes anything there, so a second process started on the same
directory never overwrites the first one's record, and a refused one writes nothing there. It is an flock (through
`filelock`): the kernel drops it when its process dies, however it dies, so a stale lock of a killed run is simply
taken over.
"""

import errno
import os
import shutil
from pathlib import Path

from filelock import FileLock, Timeout
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

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
    _entries.pop(str(run_dir), None)  # a later run of this process there (a sweep's next job) decides anew
    _links.pop(os.path.realpath(run_dir), None)


# The folders of a run directory that the project writes in by name, and TensorBoard's run folders in its own (a
# resume writes its events there); a tracker's own folder (wandb/, mlruns/) is its own: wandb links its logs to
# ~/.cache there itself.
OWN_FOLDERS = (".hydra", "checkpoints", "tensorboard")


def outside_link(run_dir: str | Path) -> str | None:
    """What is wrong with an entry of the directory, of OWN_FOLDERS in it (wherever in it their links lead) or of
    TensorBoard's run folders, that the run would write through into a file elsewhere: a link that leads outside it,
    a loop of links, or a file with another name (a hard link); None if there is none. Links within it (Lightning's
    save_last=link) are left alone."""
    root = Path(os.path.realpath(run_dir))
    folders = [root]
    for name in OWN_FOLDERS:
        folder = Path(os.path.realpath(root / name))
        if folder.is_dir() and folder.is_relative_to(root) and folder != root:
            folders.append(folder)
            if name == "tensorboard":
                runs = {Path(os.path.realpath(entry)) for entry in folder.iterdir()}
                folders += [run for run in runs if run.is_dir() and run.is_relative_to(root) and run != root]
    for entry in (entry for folder in folders for entry in folder.iterdir()):
        if entry.is_symlink():
            try:
                target = Path(os.path.realpath(entry, strict=True))
            except OSError as err:
                if err.errno == errno.ELOOP:
                    return f"{entry} is a loop of links, which a run cannot write through: delete it"
                target = Path(os.path.realpath(entry))  # a link to nothing yet: writing through it makes its target
            if not target.is_relative_to(root):
                return (
                    f"{entry} is a link to {target}, outside the run directory, which a run would write through: "
                    "replace it with a copy of what it points to, or delete it (a run writes in its own directory only)"
                )
        elif entry.is_file() and entry.stat().st_nlink > 1:
            return (
                f"{entry} is a hard link: the run would write into the file of its other name too. Replace it with a "
                "copy (cp without -l), or delete it"
            )
    return None


def check_claimed(run_dir: str | Path) -> None:
    """Refuse to work in a directory another process is working in (a second train.py, or a second resume=), or one
    holding a link that leads outside it (`outside_link`)."""
    if problem := _links.get(os.path.realpath(run_dir)):
        raise UserError(problem)
    if not claim(run_dir):
        if problem := lock_problem(run_dir):
            raise UserError(problem)
        raise UserError(
            f"{run_dir} is in use by another process (a run, a sweep, or a resume= of a run, still going): wait for it "
            "to end, or choose another directory"
        )


def holds_a_run(run_dir: str | Path) -> bool:
    """Whether a run lives (or lived) here: its record (of train.py or test.py), checkpoints of one, or Hydra's
    record of one that never got as far as its own; or a sweep (`holds_a_sweep`), whose summary and report a run
    would replace."""
    checkpoints, hydra = Path(run_dir) / "checkpoints", Path(run_dir) / ".hydra" / "config.yaml"
    held = holds_a_run_record(run_dir) or hydra.exists() or holds_a_sweep(run_dir)
    return held or (checkpoints.is_dir() and any(checkpoints.glob("*.ckpt")))


def holds_a_sweep(run_dir: str | Path) -> bool:
    """Whether a sweep ran here: Hydra's record of it (multirun.yaml, which an Optuna search does not write), its
    summary, or Optuna's results."""
    names = ("multirun.yaml", "summary.csv", "optimization_results.yaml")
    return any(os.path.lexists(Path(run_dir) / name) for name in names)


def holds_a_run_record(run_dir: str | Path) -> bool:
    """Whether a metrics.json is there, whatever it holds (a link or a FIFO too)."""
    return record.path(run_dir).exists() or record.path(run_dir).is_symlink()


def check_entered(run_dir: str | Path, task: str) -> None:
    """Refuse to work in `run_dir` unless this process may: it holds the lock, and the directory held no run it may
    not continue when Hydra chose it (Hydra has written its own record there since)."""
    check_claimed(run_dir)
    if entry(run_dir, task) == "refused":
        check_new(run_dir, task)
        raise UserError(f"{run_dir} holds a run this one may not continue: choose another hydra.run.dir")


def check_new(run_dir: str | Path, task: str) -> None:
    """Refuse to start a new run of `task` (train, test) in a directory that already holds one: a new run never
    replaces one, and a test's record would replace a training run's (its settings, its status, its resume)."""
    if not holds_a_run(run_dir):
        return
    new = f"{run_dir} already holds a run: choose another hydra.run.dir (a new run never replaces one)"
    if holds_a_sweep(run_dir) and not holds_a_run_record(run_dir):
        raise UserError(new.replace("a run:", "a sweep:", 1))
    if record.read(run_dir) is not None:
        raise UserError(new + (f", or continue an unfinished one with resume={run_dir}" if task == "train" else ""))
    if holds_a_run_record(run_dir):
        raise UserError(f"{new}; its {record.NAME} is not a run record, so it cannot be continued either")
    raise UserError(f"{new}; it never got as far as its {record.NAME}: delete it to start again there")


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


# Choosing the directory, before Hydra writes there: the resolvers of conf/hydra/default.yaml and its job logging.


def resumable(resume: str | None) -> bool:
    """Whether resume= names a run of train.py that has not finished: only then may Hydra write into it."""
    if not resume:
        return False
    saved = record.read(resume)
    return saved is not None and saved["status"] != record.FINISHED


def _run_dir(resume: str | None, new: str) -> str:
    """hydra.run.dir: the run named by resume=<run dir> when it can be resumed, else a new one: a wrong resume= then
    fails in a new run directory instead of writing Hydra's files into the directory it names. A SLURM job's run
    is named for the job, so that when SLURM requeues it (same job id) it finds its own run again and continues."""
    if resumable(resume):
        return str(resume)
    job = slurm_job()
    chosen = str(Path(new).parent / f"slurm-{job}") if job else new
    if not Path(chosen).exists():
        _mark_made(chosen)
    return chosen


# The run directories this process chose anew (none existed): a run refused before it starts may leave none behind.
# Each with the topmost of its folders that did not exist either (Hydra makes them all).
_made: dict[Path, Path] = {}


def _mark_made(run_dir: str | Path) -> None:
    key = Path(run_dir).resolve()
    top = key
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    _made.setdefault(key, top)


# What Hydra and a run write in its directory before it starts; anything else there is kept.
_BEFORE_START = {".hydra", LOCK, "config.yaml", "train.log", "test.log"}


def note_given_run_dir(args: list[str]) -> None:
    """Called before Hydra makes the run directory a command line names (`hydra.run.dir=DIR`, no interpolation):
    one that does not exist yet is made for this run, and removed if the run is refused before it starts; one that
    exists, even empty, is the user's (`discard_unstarted`)."""
    for arg in args:
        key, _, value = arg.partition("=")
        value = value[1:-1] if len(value) > 1 and value[0] == value[-1] and value[0] in "'\"" else value
        if key.lstrip("+") == "hydra.run.dir" and value and "${" not in value and not os.path.lexists(value):
            _mark_made(value)


def discard_unstarted(run_dir: str | Path, new: bool = False) -> None:
    """Remove a directory this process made for a run refused before it started (holding nothing but what Hydra and
    the start wrote), so that a mistake in the command leaves no half-made run behind. A run's own directory, one it
    was to continue, keeps the record of the refused try (.hydra/resumed-<time>/): how each start went is kept.
    `new`: the directory is known to be new (a sweep's job: its sweep held no jobs when it started)."""
    key = Path(run_dir).resolve()
    if not key.is_dir() or key == Path.cwd().resolve() or key in Path.cwd().resolve().parents:
        return
    made = key in _made or (new and holds_lock(key))
    if made and not record.path(key).exists() and {p.name for p in key.iterdir()} <= _BEFORE_START:
        release(key)
        shutil.rmtree(key, ignore_errors=True)
        top = _made.pop(key, key)
        for parent in key.parents:  # the folders made for it on the way, while they are empty
            if parent != top and top not in parent.parents:
                break
            try:
                parent.rmdir()
            except OSError:  # not empty: something else lives there now
                break


# Per run directory, once a process: how this process enters it (see `_entry`); and by where it is, links resolved,
# why a link refused it.
_entries: dict[str, str] = {}
_links: dict[str, str] = {}


def _entry(output_dir: str, task: str, resume: str | None) -> str:
    """How this process enters its run directory, decided once, before Hydra writes anything there: "new" (an empty
    or new directory), "resumed" (train.py continuing the run that lives there: `resume=` it, or a requeued SLURM
    job's own unfinished run), "refused" (another process works there, or a run lives there that this one may not
    continue: nothing is written into it, and the task fails with one line), or "rank-N" (a DDP rank's, in rank
    zero's directory). The directory's lock is taken now (`claim`)."""
    if output_dir not in _entries:
        if rank_zero_only.rank != 0:
            _entries[output_dir] = f"rank-{rank_zero_only.rank}"
        elif not claim(output_dir):
            _entries[output_dir] = "refused"
        elif not holds_a_run(output_dir):
            _entries[output_dir] = "new"
        elif task == "train" and requeued() and not holds_a_run_record(output_dir):
            _entries[output_dir] = "new"  # SLURM started its job again before it recorded anything: it starts again
        elif task == "train" and resumable(output_dir) and (_same(resume, output_dir) or requeued()):
            _entries[output_dir] = "resumed"
        else:
            _entries[output_dir] = "refused"
        if _entries[output_dir] in ("new", "resumed") and (problem := outside_link(output_dir)):
            _entries[output_dir], _links[os.path.realpath(output_dir)] = "refused", problem
    return _entries[output_dir]


def entry(output_dir: str | Path, task: str, resume: str | None = None) -> str:
    """How this process entered `output_dir` (see `_entry`): decided when Hydra chose it, or now (a task run
    without Hydra's resolvers, as the tests' compose API does)."""
    return _entry(str(output_dir), task, resume)


def _same(resume: str | None, output_dir: str) -> bool:
    return bool(resume) and Path(str(resume)).resolve() == Path(output_dir).resolve()


def _hydra_subdir(output_dir: str, time: str, task: str = "train", resume: str | None = None) -> str | None:
    """hydra.output_subdir, where Hydra records the config: `.hydra` for a new run, `.hydra/resumed-<time>` for a
    resumed one (how the run was started is kept), none for a refused one (Hydra then writes no record)."""
    entered = _entry(output_dir, task, resume)
    if entered == "refused":
        return None
    return {"new": ".hydra", "resumed": f".hydra/resumed-{time}"}.get(entered, f".hydra/{entered}")


def _log_file(output_dir: str, task: str, resume: str | None = None) -> str:
    """The run's log file, <task>.log in its directory; a refused run logs nowhere but the console, so it adds no
    lines to the log of the run it was refused into."""
    if _entry(output_dir, task, resume) == "refused":
        return os.devnull
    return str(Path(output_dir) / f"{task}.log")


def register_resolvers() -> None:
    """The resolvers conf/hydra/default.yaml and conf/hydra/job_logging/cnn_exp.yaml choose the run directory, its
    record and its log file with; registered by the entry points before Hydra resolves them (cnn_exp/run.setup)."""
    OmegaConf.register_new_resolver("run_dir", _run_dir, replace=True)
    OmegaConf.register_new_resolver("hydra_subdir", _hydra_subdir, replace=True)
    OmegaConf.register_new_resolver("run_log", _log_file, replace=True)
