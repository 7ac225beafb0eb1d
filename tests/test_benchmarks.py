"""The accuracy measurement in benchmarks/: its shifted views and its validation split are what it says."""

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
    assert {tuple(shift) for shift in shift_scores.FOUR} <= set(shift_scores.EIGHT) and len(shift_scores.EIGHT) == 8


def test_shift_scores_scores_the_runs_own_validation_images(
    trained: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    best = read_metrics(trained)["best"]
    monkeypatch.setattr(sys, "argv", ["shift_scores", best["checkpoint"]])
    shift_scores.main()
    lines = capsys.readouterr().out.splitlines()
    assert [line[:16].strip() for line in lines] == ["image alone", "with its mirror", "and 4 shifts", "and 8 shifts"]
    # The image alone is how the run validated (no flip_average): the same accuracy on the same 200 images.
    assert lines[0].split()[2] == f"{best['val/acc']:.2%}" and "of 200 " in lines[0]


def test_shift_scores_refuses_a_missing_checkpoint_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["shift_scores", str(tmp_path / "missing.ckpt")])
    with pytest.raises(SystemExit, match=r"^error: ckpt_path=.*missing\.ckpt: no such file"):
        shift_scores.main()
