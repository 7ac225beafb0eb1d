"""Stopping a run cleanly on the signals that schedulers and terminals send, with its exact training state saved.

SLURM (at preemption and at the time limit), Kubernetes and systemd send SIGTERM, then SIGKILL after a grace
period; a terminal sends SIGINT (Ctrl-C). Lightning alone acts on SIGTERM only at the end of an epoch, which can be
past the grace period, and then exits 0. Here the run finishes the batch in hand, saves `step.ckpt`, and stops with
`Interrupted`, which the entry points turn into the shell's exit status (128 + the signal's number).

Under SLURM, the signal SLURM sends ahead of the time limit (`#SBATCH --signal=USR1@90`, Lightning's
`SLURMEnvironment.requeue_signal`) does the same and then asks SLURM to requeue the job, as Lightning's
auto-requeue does, which is turned off for it: Lightning would save from inside the signal handler, in the
middle of an optimizer step, and a requeued run would not continue exactly.

Lightning installs its own SIGTERM handler each time a Trainer runs; it ends the run at its next loop boundary with
`SystemExit` (exit status 0), racing this one (a signal during an epoch's last batch or a validation ended the
run that way). `StopOnSignal` takes SIGTERM back as each stage starts, and forwards it to DDP's other ranks as
Lightning's handler does.
"""

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

from cnn_exp.rundir import slurm_job

log = logging.getLogger(__name__)


class Interrupted(BaseException):
    """A run stopped by a signal. Not an Exception: in a sweep it must stop the sweep, not fail one job."""

    def __init__(self, signum: int, requeued: bool = False, before_job: bool = False) -> None:
        self.signum, self.requeued, self.before_job = signum, requeued, before_job
        super().__init__(signal.Signals(signum).name)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's convention: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


def slurm_requeue_signal() -> int | None:
    """The signal SLURM sends ahead of the time limit when this process is a SLURM job, else None."""
    if not SLURMEnvironment.detect():
        return None
    return int(SLURMEnvironment().requeue_signal or signal.SIGUSR1)


# A signal that came outside a job of a sweep run in this process (between jobs, or after a job's last batch): the
# next job stops the sweep as it starts (cnn_exp/run.py), its summary listing the jobs it did not run.
_held: int | None = None


def hold_between_jobs() -> None:
    """In a sweep whose jobs run in this process: a SIGINT or SIGTERM outside a job's training no longer ends the
    process where it stands (Ctrl-C a traceback and no summary, SIGTERM at once): it is held for the next job.
    Each job's `StopOnSignal.handling` replaces this while it runs, and puts it back. A second signal stops the
    process at once, as Python and the system would have."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        _before.setdefault(signum, signal.getsignal(signum))
        signal.signal(signum, _hold)


def stop_holding() -> int | None:
    """The sweep has ended: the handlers as they were before it, and the signal it held, if any (taken)."""
    global _held
    for signum, handler in _before.items():
        signal.signal(signum, handler)
    _before.clear()
    held, _held = _held, None
    return held


# The handlers `hold_between_jobs` replaced.
_before: dict[int, Any] = {}


def _hold(signum: int, frame: FrameType | None) -> None:
    global _held
    if _held is not None:  # the second: at once
        for held_signal in (signal.SIGTERM, signal.SIGINT):
            signal.signal(held_signal, signal.SIG_DFL if held_signal == signal.SIGTERM else signal.default_int_handler)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)
        return
    _held = signum
    # On the console too: a sweep's job writes its lines to its own log.
    print(
        f"{signal.Signals(signum).name} received: the sweep stops before its next job (again: at once)", file=sys.stderr
    )


def held() -> int | None:
    """The signal a sweep holds for its next job (`hold_between_jobs`), if one came."""
    return _held


class StopOnSignal(L.Callback):
    """Ends training or testing at the next batch boundary after a signal, saving the exact state first.

    `handling()` installs the handlers for the whole task. While a Trainer runs, a signal only sets a flag and the
    batch in hand finishes (a validation in progress too, a few seconds); before and after, there is nothing
    half-done to save and the run stops at once. A second signal stops it at once in any case.
    """

    def __init__(self, dirpath: str | Path, save: bool = True) -> None:
        self.dirpath, self.save = Path(dirpath), save
        self.received: int | None = None
        self.running = False
        self.trainer: L.Trainer | None = None
        self._deferring = False  # while the run's record is written (`deferred`)
        self._late: int | None = None  # a signal that came then

    @contextmanager
    def handling(self) -> Iterator["StopOnSignal"]:
        """Install the handlers (main thread only: Python delivers signals there) and restore the old ones after."""
        signals = [signal.SIGTERM, signal.SIGINT]
        if (requeue := slurm_requeue_signal()) is not None:
            signals.append(requeue)
        previous = {signum: signal.getsignal(signum) for signum in signals}
        for signum in signals:
            signal.signal(signum, self._handle)
        try:
            yield self
            late = self.received if self.received is not None else self._late
            if late is not None:  # after the last batch: there was nothing left to stop
                log.warning("%s came after the last batch: the run has finished", signal.Signals(late).name)
                if any(handler is _hold for handler in previous.values()) and _held is None:  # a sweep's job
                    _hold(late, None)  # the sweep stops before its next job
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Signals wait while the run's record is written: stopped half-way, it would go on saying the run is running
        (the record of a run that was stopped, or finished, is then written whole)."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._deferring:
            self._late = self._late or signum
            return
        launcher = self.trainer.strategy.launcher if self.trainer is not None else None
        if launcher is not None and signum == signal.SIGTERM and self.received is None:
            launcher.kill(signum)  # the other ranks of a DDP run that this process started
        if not self.running or self.received is not None:
            # Nothing half-done to save. SLURM's signal still asks for the requeue it means: the job starts again.
            requeue = signum == slurm_requeue_signal() and self.received is None and not self.running
            self.received, self.running = None, False  # stopping now: neither stopping later nor finished
            raise Interrupted(signum, requeue and _requeue())
        self.received = signum
        log.warning("%s received: stopping after this batch", signal.Signals(signum).name)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.running = True

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_back(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_back(trainer)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_back(trainer)

    def _take_back(self, trainer: L.Trainer) -> None:
        """Replace the SIGTERM handler Lightning installed when this stage's Trainer run began (module docstring)."""
        self.trainer = trainer
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Not after an epoch's last batch: its validation and epoch-end checkpoint come first, or a resumed run would
        # skip them. The next epoch's first batch is seconds away.
        if self.received is not None and batch_idx + 1 < trainer.num_training_batches:
            if self.save:  # the moment a step checkpoint is taken at: a resume continues with the next batch
                trainer.save_checkpoint(self.dirpath / "step.ckpt", weights_only=False)
            self._stop(trainer)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.received is not None:  # training had ended: a resume runs the whole test again
            self._stop(trainer)

    def _stop(self, trainer: L.Trainer) -> None:
        signum, self.received, self.running = self.received, None, False
        requeued = signum == slurm_requeue_signal() and trainer.is_global_zero and _requeue()
        raise Interrupted(signum, requeued)


def _requeue() -> bool:
    """Ask SLURM to put this job back in its queue, as Lightning's auto-requeue does; True if it agreed.

    Called only on SLURM's requeue signal, which `slurm_requeue_signal` names only where Lightning sees a SLURM job:
    where `slurm_job` gives the job's id.
    """
    job = slurm_job() or ""  # no id set: scontrol refuses "", and its refusal is logged
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.error("could not requeue SLURM job %s: %s", job, err)
        return False
    if done.returncode:
        log.error("scontrol requeue %s failed: %s", job, done.stderr.strip())
    return done.returncode == 0
