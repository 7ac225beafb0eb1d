"""Text read from a file is shown as data: a checkpoint's class names and the names of image files reach the console,
the log and the figures as the characters they are, never as an escape sequence, a line of their own, Rich markup
or a Matplotlib formula."""

import csv
import os
import re
import unicodedata
from pathlib import Path
from subprocess import CompletedProcess
from types import SimpleNamespace

import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cnn_exp.reports import _log_per_class
from tests.conftest import MIRROR, run

# Ten class names, each a way text can act on what shows it.
CLASSES = [
    "\x1b]0;pwned\x07",  # an escape sequence that retitles the terminal's window
    "\x1b[2J",  # one that clears the screen
    "two\nfinished: test/acc 1.0000",  # a newline that forges a result line
    "T-shirt[/]",  # Rich markup that closes nothing: Rich fails on it
    "[bold]b",  # Rich markup that would style the rest
    "\u202eevil",  # a right-to-left override: what follows shows reversed ("live")
    "$_$",  # mathtext that Matplotlib cannot parse: the figure fails
    "\x9b2J",  # a C1 control: some terminals read it as ESC [
    "one\u2028line",  # Unicode's line separator
    "T-shirt/top",
]
FORGED = "finished: test/acc 1.0000"  # the trained run's accuracy is about 0.4: only a forged line says 1.0000
WIDE = os.environ | {"COLUMNS": "200"}  # tables as wide as their names: a name is found whole, not folded


def crafted(trained: Path, folder: Path) -> Path:
    """The shared run's checkpoint with CLASSES as its class names, as anyone can write one."""
    checkpoint = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["datamodule_hyper_parameters"]["classes"] = CLASSES
    path = folder / "crafted.ckpt"
    torch.save(checkpoint, path)
    return path


def assert_shown_as_data(proc: CompletedProcess) -> str:
    """The run finished and printed no control character but its line ends, and no line that it did not write."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    controls = sorted({hex(ord(c)) for c in out if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") and c != "\n"})
    assert not controls, f"printed as they are: {controls}"
    for line in out.split("\n"):  # a table's cell is a line too: its borders aside
        assert not line.strip(" │┃").startswith((FORGED, "error: forged")), line
    return out


def test_a_checkpoints_class_names_are_printed_and_drawn_as_text(trained: Path, tmp_path: Path, data_dir: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run(
        "test.py",
        f"ckpt_path={crafted(trained, tmp_path)}",
        f"hydra.run.dir={run_dir}",
        f"paths.data_dir={data_dir}",
        f"paths.data_mirror={MIRROR}",
        check=False,
        env=WIDE,
    )
    out = assert_shown_as_data(proc)
    for text in (
        r"\x1b]0;pwned\x07",
        r"\x1b[2J",
        r"two\nfinished:",
        "T-shirt[/]",
        "[bold]b",
        "$_$",
        r"\x9b2J",
        r"\u202eevil",
    ):
        assert text in out
    assert (run_dir / "confusion_matrix.png").stat().st_size > 10_000
    assert (run_dir / "misclassified.png").stat().st_size > 10_000
    with open(run_dir / "per_class.csv", newline="") as f:  # a CSV file holds the names as they are
        assert [row["class"] for row in csv.DictReader(f)] == CLASSES


def test_image_file_names_are_printed_logged_and_drawn_as_text(trained: Path, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    digit = Image.fromarray(np.pad(np.full((12, 4), 255, np.uint8), 8))
    names = ["\x1b]0;pwned\x07.png", "\x1b[2J.png", "x\nerror: forged.png", "[red]x.png", "$_$.png", "\x9b2J.png",
             "\u202egnp.exe.png"]  # fmt: skip
    for name in names:
        digit.save(folder / name, format="PNG")
    (folder / "\x1b[2J notes.txt").write_text("not a picture")  # skipped, and named in a warning
    run_dir = tmp_path / "run"
    checkpoint = crafted(trained, tmp_path)
    proc = run(
        "test.py", f"ckpt_path={checkpoint}", f"predict={folder}", f"hydra.run.dir={run_dir}", check=False, env=WIDE
    )
    out = assert_shown_as_data(proc)
    assert rf"skipped {folder}/\x1b[2J notes.txt: not an image" in out
    for text in (r"\x1b]0;pwned\x07.png", r"x\nerror: forged.png", "[red]x.png", "$_$.png", r"\x9b2J.png"):
        assert text in out
    assert (run_dir / "predictions.png").stat().st_size > 10_000
    with open(run_dir / "predictions.csv", newline="") as f:  # a CSV file holds the names as they are
        assert sorted(Path(row["file"]).name for row in csv.DictReader(f)) == sorted(names)


def test_class_names_become_tensorboard_tags_of_word_characters(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="", version="")
    trainer = SimpleNamespace(loggers=[logger], global_step=0)
    _log_per_class(trainer, "test", [*CLASSES, "T-shirt-top", "Ankle boot"], torch.linspace(0, 1, 12))
    logger.experiment.flush()
    tags = EventAccumulator(str(tmp_path)).Reload().Tags()["scalars"]
    assert len(tags) == 12, "one per class, even where two names make one tag"
    assert all(re.fullmatch(r"test/class_acc/[\w.-]+", tag) for tag in tags), tags
    assert {"test/class_acc/T-shirt-top", "test/class_acc/Ankle_boot"} <= set(tags)  # as they were named before
