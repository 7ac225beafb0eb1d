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


def test_control_characters_reach_the_lab_report_as_text() -> None:
    """A class name or a record's text holding an escape sequence would recolour the terminal that shows report.md;
    line breaks and tabs stay (the network's forward() is shown as written)."""
    from cnn_exp import report

    template = report._environment().from_string("{{ name }}|{{ code }}")
    assert template.render(name="\x1b[31mred\x1b]0;title\x07", code="a\n\tb") == "\\x1b[31mred\\x1b]0;title\\x07|a\n\tb"


def test_names_that_are_not_utf8_are_refused_or_shown_by_their_bytes(tmp_path: Path) -> None:
    """Python holds a file name that is not UTF-8 as lone surrogates, which no printer can encode."""
    from cnn_exp import folder, predict
    from cnn_exp.errors import UserError, shown

    odd = os.fsdecode(b"x\xff.png")
    assert shown(odd) == "x\\udcff.png"
    predictions = [predict.Prediction(Path(odd), torch.zeros(1, 28, 28), [("7", 0.9)])]
    predict.write_csv(tmp_path / "predictions.csv", predictions)  # the file's own bytes, as it is named
    assert b"x\xff.png,7,0.9000" in (tmp_path / "predictions.csv").read_bytes()
    root = tmp_path / "root"
    for name in (os.fsdecode(b"bad\xfename"), "ok"):
        (root / name).mkdir(parents=True)
        Image.new("L", (28, 28)).save(root / name / "a.png")
    try:
        folder._list(root, "data.root")
    except UserError as err:
        assert str(err) == "data.root/bad\\udcfename: a class name must be text (UTF-8): rename the folder"
    else:
        raise AssertionError("a class folder named by bytes that are not UTF-8 was taken")


def test_a_fifo_named_like_an_image_is_not_read(tmp_path: Path) -> None:
    """Reading it would wait forever for a writer."""
    from cnn_exp import folder

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("L", (28, 28)).save(tmp_path / name / "1.png")
    os.mkfifo(tmp_path / "a" / "zz.png")
    classes, samples = folder._list(tmp_path, "data.root")
    assert classes == ["a", "b"] and [path.name for path, _ in samples] == ["1.png", "1.png"]


def test_a_transparent_drawing_is_ink_on_white_paper_and_a_float_image_is_named() -> None:
    """docs/predict.md: a transparent canvas becomes white paper, as a folder's images are read."""
    from cnn_exp.errors import UserError
    from cnn_exp.images import frame

    drawing = Image.new("RGBA", (60, 60), (0, 0, 0, 0))
    drawing.paste((0, 0, 0, 255), (20, 10, 40, 50))  # black ink on a transparent canvas
    assert frame(drawing, "MNIST").max() == 1  # not "blank"
    try:
        frame(Image.new("F", (28, 28)), "MNIST", name="f.tiff")
    except UserError as err:
        assert str(err).startswith("f.tiff: F images (floating-point pixels) are not read")
    else:
        raise AssertionError("a floating-point image was read")
