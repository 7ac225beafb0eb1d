"""The accuracy measurement in benchmarks/: its shifted views and its validation split are what it says."""

import re
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import shift_scores
from tests.conftest import read_metrics


def test_shifted_moves_the_image_and_fills_the_uncovered_edge_with_the_background() -> None:
    image = torch.arange(9.0).reshape(1, 1, 3, 3)
    right = shift_scores.shifted(image, 1, 0, background=-1.0)
    assert right[0, 0].tolist() == [[-1, 0, 1], [-1, 3, 4], [-1, 6, 7]]
    up = shift_scores.shifted(image, 0, -1, background=-1.0)
    assert up[0, 0].tolist() == [[3, 4, 5], [6, 7, 8], [-1, -1, -1]]
    two_down = shift_scores.shifted(image, 0, 2, background=-1.0)
    assert two_down[0, 0].tolist() == [[-1, -1, -1], [-1, -1, -1], [0, 1, 2]]


def test_shift_scores_scores_the_runs_own_validation_images(
    trained: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    best = read_metrics(trained)["best"]
    monkeypatch.setattr(sys, "argv", ["shift_scores", best["checkpoint"]])
    shift_scores.main()
    lines = capsys.readouterr().out.splitlines()
    assert [line[:16].strip() for line in lines] == ["image alone", "with its mirror", "and 4 shifts", "and 8 shifts"]
    # The image alone is how the run validated (no flip_average): the same accuracy on the same 200 images.
    assert lines[0].split()[2] == f"{best['val/acc']:.2%}" and lines[0].endswith("of 200")
    # Each other way's accuracy is the image alone's, plus the images it gets right, less those it gets wrong.
    right_alone = round(float(lines[0].split()[2].rstrip("%")) * 2)
    for line in lines[1:]:
        match = re.search(r"([\d.]+)% of 200 \(\+(\d+) -(\d+) against", line)
        assert match, line
        accuracy, gained, lost = float(match[1]), int(match[2]), int(match[3])
        assert round(accuracy * 2) == right_alone + gained - lost


def test_shift_scores_refuses_a_missing_checkpoint_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["shift_scores", str(tmp_path / "missing.ckpt")])
    with pytest.raises(SystemExit, match=r"^error: ckpt_path=.*missing\.ckpt: no such file"):
        shift_scores.main()
