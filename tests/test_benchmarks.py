"""The measurements in benchmarks/: the accuracy measurement's shifted views and validation split, and the recipes
table's numbers, are what they say."""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from benchmarks import ablation, compare, loops, recipes, shift_scores
from cnn_exp.data import MNISTDataModule
from cnn_exp.net import ConvNet
from tests.conftest import MIRROR, NO_FIGURES, ONE_THREAD, ROOT, read_metrics


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


@pytest.mark.slow  # two whole train.py commands, imports and all: ~14 s
def test_recipes_table_shows_what_the_runs_wrote(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """mnist_small against seed_mnist, one tiny whole command each: every number in the row is the runs' own."""
    monkeypatch.delenv("CNN_EXP_DATA_MIRROR", raising=False)
    for name, value in ONE_THREAD.items():
        monkeypatch.setenv(name, value)
    tiny = ["data.val_size=200", "trainer.max_epochs=1", "++trainer.limit_train_batches=3",
            "++trainer.limit_val_batches=1", "~logger", *NO_FIGURES]  # fmt: skip
    keep = tmp_path / "runs"
    argv = ["--recipes", "mnist_small", "--mirror", str(MIRROR), "--data-dir", str(data_dir), "--keep", str(keep)]
    recipes.main([*argv, "--override", *tiny])
    out = capsys.readouterr().out
    assert re.search(r"^Machine: .+, \d+ cores, .+; \d{4}-\d\d-\d\d$", out, re.M), out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| mnist_small |")]
    assert len(rows) == 1, out
    (_, reference, precision, acc, ref_acc, whole, ref_whole, ratio, startup, training, rest) = rows[0]
    assert reference == "seed_mnist"
    ran = {role: keep / f"round0-seed0-mnist_small-{role}" for role in ("recipe", "reference")}
    assert sorted(keep.iterdir()) == sorted(ran.values())  # one run each, nothing else
    record = {role: read_metrics(folder / "run") for role, folder in ran.items()}
    assert [record[role]["settings"]["experiment"] for role in ran] == ["mnist_small", "seed_mnist"]
    assert all(r["settings"]["seed"] == 0 and r["status"] == "finished" for r in record.values())
    assert precision == f"{record['recipe']['settings']['precision']} / {record['reference']['settings']['precision']}"
    assert acc == f"{record['recipe']['metrics']['test/acc'] * 100:.2f} %"
    assert ref_acc == f"{record['reference']['metrics']['test/acc'] * 100:.2f} %"
    # Training: the timer's epochs, first epoch's start to the end of training, as each process wrote them.
    epochs = {role: json.loads((folder / "times.json").read_text())["epochs"] for role, folder in ran.items()}
    assert len(epochs["recipe"]) == len(epochs["reference"]) == 1
    assert training == f"{sum(epochs['recipe']):.2f} / {sum(epochs['reference']):.2f} s"

    def seconds(cell: str) -> list[float]:
        return [float(x) for x in re.findall(r"[\d.]+", cell)]

    # A whole command holds all that train.py timed of itself, and is start-up + training + rest.
    (a,), (b,) = seconds(whole), seconds(ref_whole)
    assert a >= record["recipe"]["wall_time_s"] and b >= record["reference"]["wall_time_s"]
    for i, total in enumerate((a, b)):
        parts = [seconds(cell)[i] for cell in (startup, training, rest)]
        assert min(parts) > 0 and abs(sum(parts) - total) <= 0.02, (parts, total)
    # One round, one seed: the ratio is the two times' ratio, to the rounding of the numbers shown.
    median, low, high = seconds(ratio)
    assert median == low == high
    assert (a - 0.005) / (b + 0.005) - 0.005 <= median <= (a + 0.005) / (b - 0.005) + 0.005


def test_recipes_table_refuses_an_unknown_recipe_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def ran(*args: object, **kwargs: object) -> None:
        raise AssertionError("a run started")

    monkeypatch.setattr(subprocess, "run", ran)
    argv = ["--recipes", "mnist_small", "no_such_recipe", "--data-dir", str(tmp_path / "data")]
    with pytest.raises(SystemExit, match=r"^error: no such recipe: experiment=no_such_recipe \(conf/experiment/ has "):
        recipes.main(argv)
    assert not (tmp_path / "data").exists()


def test_recipes_schedule_runs_each_recipe_beside_its_reference_in_rotating_order() -> None:
    rounds = [recipes.schedule(["a", "b"], [0, 1], r) for r in range(4)]
    assert rounds[0] == [
        ("a", 0, "recipe"), ("a", 0, "reference"), ("a", 1, "reference"), ("a", 1, "recipe"),
        ("b", 0, "recipe"), ("b", 0, "reference"), ("b", 1, "reference"), ("b", 1, "recipe"),
    ]  # fmt: skip
    assert rounds[1][:2] == [("a", 1, "recipe"), ("a", 1, "reference")]  # the pairs one place on, each turned
    for runs in rounds:  # every pair once a round, its two runs side by side
        pairs = [runs[i : i + 2] for i in range(0, len(runs), 2)]
        assert all(x[:2] == y[:2] and {x[2], y[2]} == {"recipe", "reference"} for x, y in pairs)
        assert sorted(x[:2] for x, _ in pairs) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    # Each pair goes recipe first in one round and reference first in the next.
    first = [{(x[0], x[1]): x[2] for x in runs[::2]} for runs in rounds]
    assert all(first[r][pair] != first[r + 1][pair] for r in range(3) for pair in first[r])


@pytest.mark.parametrize("recipe", list(ablation.ROWS))
def test_the_ablations_last_cumulative_row_is_the_recipe_itself(recipe: str) -> None:
    """Row by row the ablation adds one method; its last cumulative row must compose to exactly the recipe, else the
    table would credit methods to a configuration nobody runs. The first row differs from the recipe."""

    def composed(*overrides: str) -> dict:
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            return OmegaConf.to_container(compose("train", overrides=[f"experiment={recipe}", *overrides]))

    rows = [overrides for label, overrides in ablation.rows(recipe) if not label.startswith("not kept")]
    assert composed(*rows[-1]) == composed()
    assert composed(*rows[0]) != composed()
    assert all(len(set(o.split("=")[0] for o in row)) == len(row) for row in rows)  # each key set once


def test_the_ablation_finds_the_first_epoch_at_the_bar() -> None:
    """airbench's "epochs to 94 %": the first epochs.csv row at or above the bar, none where no row reaches it."""
    rows = [{"epoch": str(e), "val/acc": acc} for e, acc in enumerate(["0.9", "", "0.9399", "0.94", "0.95"], start=1)]
    assert ablation.first_epoch_at(rows, 0.94) == 4
    assert ablation.first_epoch_at(rows, 0.96) is None
    assert ablation.first_epoch_at(rows, None) is None


@pytest.mark.parametrize(
    ("loop", "precision"),
    [("notebook", "32-true"), ("bare", "32-true"), ("bare", "bf16-mixed"), ("lightning", "bf16-mixed")],
)
def test_each_loop_compare_measures_trains_and_times_its_epochs(
    loop: str,
    precision: str,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The loops compare.py runs beside train.py compose the network as train.py does and time every epoch, in the
    precision asked for: the network's forward under bf16 autocast with bf16-mixed."""
    monkeypatch.chdir(ROOT)
    MNISTDataModule("MNIST", data_dir=data_dir, mirror=MIRROR).prepare_data()  # as compare.py fills --data-dir
    argv = [
        loop,
        "--model",
        "net2",
        "--data",
        "mnist",
        "--batch-size",
        "250",
        "--epochs",
        "2",
        "--data-dir",
        str(data_dir),
        "--precision",
        precision,
    ]
    monkeypatch.setattr(sys, "argv", ["loops", *argv, *(["--channels-last"] if loop != "notebook" else [])])
    dtypes = set()
    real_forward = ConvNet.forward

    def forward(self: ConvNet, images: torch.Tensor) -> torch.Tensor:
        out = real_forward(self, images)
        dtypes.add(out.dtype)
        return out

    monkeypatch.setattr(ConvNet, "forward", forward)
    loops.main()
    assert dtypes == {torch.bfloat16 if precision == "bf16-mixed" else torch.float32}
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(result["epochs"]) == 2 and all(seconds > 0 for seconds in result["epochs"])
    assert result["first_step"] > 0


def test_compare_refuses_a_precision_for_a_table_of_its_own_settings() -> None:
    """A --table compares its rows against its first: one --precision for all of them would change that baseline."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare", "--table", "options", "--precision", "bf16-mixed"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith(
        "error: --precision is for the paths side by side; a --table sets each row's own (or use --override)"
    )


def test_compare_trains_all_but_the_notebooks_loop_in_the_precision_asked_for(tmp_path: Path) -> None:
    """--precision reaches train.py and the bare and Lightning loops; the notebook's loop stays as the notebook ran."""
    case, out = compare.CASES["Network2 / MNIST"], tmp_path / "times.json"
    for precision in (None, "bf16-mixed"):
        args = argparse.Namespace(epochs=2, data_dir="data", device="cpu", precision=precision)
        commands = {variant: compare.command(variant, case, args, out, []) for variant in compare.VARIANTS}
        asked = {variant for variant, cmd in commands.items() if any("bf16-mixed" in part for part in cmd)}
        assert asked == (set() if precision is None else set(compare.VARIANTS) - {"notebook"})
    assert "trainer.precision=bf16-mixed" in commands["train.py"]


@pytest.mark.skipif(len(compare.CORES) < 2, reason="--pinned needs two cores")
def test_pinned_jobs_run_at_once_each_on_its_own_core_with_one_thread(tmp_path: Path) -> None:
    """compare.py --pinned: the two processes overlap in time, each held to the core it was given, with torch's
    threads at one; their times are read as a sequential run's are."""
    job = (
        "import json, os, sys, time, torch; start = time.time(); time.sleep(1); "
        "json.dump({'first_step': start, 'epochs': [9.0, 2.0, 4.0]}, open(sys.argv[1], 'w')); "
        "json.dump({'cores': sorted(os.sched_getaffinity(0)), 'threads': torch.get_num_threads(), "
        "'start': start, 'end': time.time()}, open(sys.argv[1] + '.seen', 'w'))"
    )
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    cores = compare.CORES[::-1]
    results = compare.measure_together([([sys.executable, "-c", job, str(out)], out) for out in outs], "cpu", cores)
    assert [r["epoch"] for r in results] == [3.0, 3.0] and all(r["startup"] < 5 for r in results)
    seen = [json.loads(Path(f"{out}.seen").read_text()) for out in outs]
    assert [s["cores"] for s in seen] == [[c] for c in cores] and {s["threads"] for s in seen} == {1}
    assert seen[0]["start"] < seen[1]["end"] and seen[1]["start"] < seen[0]["end"], "they ran at the same time"


def test_a_failed_job_stops_the_one_beside_it(tmp_path: Path) -> None:
    """A job that fails ends the measurement with its error as soon as it fails, and takes the job beside it down
    rather than leaving it running (and timing whatever comes next)."""
    pid_file = tmp_path / "pid"
    long = [
        sys.executable,
        "-c",
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)",
    ]
    bad = [sys.executable, "-c", "import time; time.sleep(1.5); raise SystemExit('no data here')"]
    started = time.time()
    with pytest.raises(SystemExit, match="no data here"):
        compare.measure_together([(long, tmp_path / "long.json"), (bad, tmp_path / "bad.json")], "cpu")
    assert time.time() - started < 30
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)
