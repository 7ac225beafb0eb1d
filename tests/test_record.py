"""The run record (cnn_exp/record.py): always valid JSON, and a file that is not a record is not read as one."""

import json
import math
from pathlib import Path

import pytest

from cnn_exp import record
from cnn_exp.rundir import resumable
from cnn_exp.sweep import summarize


def strict_json(text: str) -> object:
    """Parse as JSON readers outside Python do: NaN and Infinity are not JSON."""

    def refuse(token: str) -> None:
        raise ValueError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_diverged_metric_is_written_as_null(tmp_path: Path) -> None:
    record.write(tmp_path, {"status": "finished", "metrics": {"val/loss": math.nan, "val/acc": 0.5}, "x": [-math.inf]})
    written = strict_json((tmp_path / "metrics.json").read_text())
    assert written == {"status": "finished", "metrics": {"val/loss": None, "val/acc": 0.5}, "x": [None]}
    assert record.read(tmp_path) == written


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{not json",
        "[1, 2]",
        '"finished"',
        '{"metrics": {}}',
        '{"status": "done"}',
        '{"status": "finished", "metrics": {"val/acc": "high"}}',
        '{"status": "finished", "metrics": [0.9]}',
        '{"status": "running", "settings": "all"}',
        '{"status": "failed", "error": 3}',
        '{"status": "interrupted", "settings": {"overrides": [1, 2]}}',
        '{"status": "interrupted", "settings": {"overrides": "seed=1"}}',
    ],
)
def test_a_file_that_is_not_a_record_reads_as_none(tmp_path: Path, text: str) -> None:
    (tmp_path / "metrics.json").write_text(text)
    assert record.read(tmp_path) is None
    assert not resumable(str(tmp_path))  # Hydra does not write into it


def test_only_an_unfinished_run_can_be_resumed(tmp_path: Path) -> None:
    assert record.read(tmp_path) is None and not resumable(str(tmp_path)) and not resumable(None)
    for status in record.STATUSES:
        record.write(tmp_path, {"status": status, "settings": {"seed": 0}})
        assert record.read(tmp_path) == {"status": status, "settings": {"seed": 0}}
        assert resumable(str(tmp_path)) == (status != record.FINISHED)


def test_the_sweep_summary_ranks_a_null_metric_as_missing(tmp_path: Path) -> None:
    for job, acc in {"0": math.nan, "1": 0.5}.items():
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
        record.write(tmp_path / job, {"status": "finished", "metrics": {"val/acc": acc}})
    rows, metric = summarize(tmp_path, "val/acc")
    assert metric == "val/acc" and [(row["job"], row["val/acc"]) for row in rows] == [("1", 0.5), ("0", None)]
