"""Where a run's numbers came from: the code's commit, the library versions, the processor and the data files. Kept
in metrics.json (`provenance`) and shown in the report, so any number can be traced to what produced it."""

import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from cnn_exp.precision import native_bf16_cpu

# The checkout cnn_exp runs from (an editable install runs from it too).
ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "torchvision", "lightning", "hydra-core")


def collect(datamodule: Any = None) -> dict[str, Any]:
    """The provenance of a run on this machine with this data (its DataModule; MNIST's data files by MD5)."""
    return {
        "git": _git(),
        "versions": {"python": platform.python_version(), **{name: _version(name) for name in PACKAGES}},
        "processor": {"name": _processor(), "bf16": native_bf16_cpu(), "threads": torch.get_num_threads()},
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "data_files": data_files(datamodule),
    }


def _git() -> dict[str, Any] | None:
    """The commit of the checkout and whether it had uncommitted changes; None outside a git checkout."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10, check=True)
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _processor() -> str:
    """The processor's model name as the kernel gives it (platform.processor() says only "x86_64" on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def data_files(datamodule: Any) -> dict[str, str] | None:
    """The MD5s of MNIST's or Fashion-MNIST's four files, as checked when the run prepared its data (remembered
    beside them); None for other data."""
    files = getattr(datamodule, "files", None)
    if files is None or not hasattr(files, "checked_md5s"):
        return None
    return files.checked_md5s() or None
