"""train.py and test.py as a user runs them: outputs of a run, learning, reproducibility, sweeps, clear errors."""

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cnn_exp import rundir
from cnn_exp.errors import UserError
from tests.conftest import MIRROR, NO_FIGURES, QUICK, ROOT, TRAINED, assert_no_result, read_metrics, run, run_here

METRICS = {"train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc"}


def test_a_run_writes_metrics_checkpoints_events_config_and_log(trained: Path) -> None:
    result = read_metrics(trained)
    assert set(result["metrics"]) == METRICS
    assert all(0 <= result["metrics"][f"{split}/acc"] <= 1 for split in ("train", "val", "test"))
    assert result["epochs"] == 3 and result["steps"] == 3 * 8 and result["wall_time_s"] > 0
    settings = result["settings"]
    assert (settings["data"], settings["model"], settings["optimizer"], settings["seed"]) == ("mnist", "net2", "sgd", 7)
    assert settings["parameters"] == 32998 and settings["val_size"] == 200
    assert settings["precision"] == "32-true"
    checkpoints = sorted(p.name for p in (trained / "checkpoints").iterdir())
    assert len(checkpoints) == 2 and "last.ckpt" in checkpoints and checkpoints[0].startswith("best-epoch")
    assert result["tested"] == result["best"]["checkpoint"] == str(trained / "checkpoints" / checkpoints[0])
    tags = set()
    for events in (trained / "tensorboard").rglob("events.out.tfevents.*"):
        tags |= set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert {"train/loss_step", "loss/train", "acc/train", "loss/val", "acc/val", "test/loss", "test/acc"} <= tags
    assert "lr-SGD" in tags
    assert (trained / "config.yaml").read_text().count("seed: 7") == 2  # top level and data.seed
    assert (trained / "train.log").exists()


def test_test_py_rebuilds_everything_from_the_checkpoint_and_reproduces_the_accuracy(
    trained: Path, data_dir: Path, tmp_path: Path
) -> None:
    best = read_metrics(trained)["tested"]
    proc = run("test.py", f"ckpt_path={best}", f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path}")
    tested = read_metrics(tmp_path)
    assert tested["metrics"]["test/acc"] == pytest.approx(read_metrics(trained)["metrics"]["test/acc"], abs=1e-6)
    assert tested["metrics"]["test/loss"] == pytest.approx(read_metrics(trained)["metrics"]["test/loss"], rel=1e-5)
    assert tested["settings"]["data"]["dataset"] == "MNIST" and tested["settings"]["model"]["net"]["channels"] == [
        6,
        12,
    ]
    assert f"test/acc {tested['metrics']['test/acc']:.4f}" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_test_py_tests_in_the_precision_the_checkpoint_trained_in(paths: list[str], tmp_path: Path) -> None:
    """A bf16 run's checkpoint, tested by test.py as it comes, gives the run's own test metrics to the bit (in fp32 it
    differed by an image); trainer.precision= still chooses; a checkpoint naming an unknown precision is refused."""
    run_here("train.py", tmp_path / "run", *paths, *QUICK, *NO_FIGURES, "trainer.precision=bf16-mixed")
    trained = read_metrics(tmp_path / "run")
    checkpoint = trained["tested"]
    run_here("test.py", tmp_path / "same", *paths[:2], f"ckpt_path={checkpoint}", *NO_FIGURES[1:4])
    same = read_metrics(tmp_path / "same")
    assert same["metrics"] == {key: trained["metrics"][key] for key in same["metrics"]}
    assert same["what_ran"]["lines"]["precision"] == "bf16-mixed"
    run_here("test.py", tmp_path / "fp32", *paths[:2], f"ckpt_path={checkpoint}", "trainer.precision=32-true")
    assert read_metrics(tmp_path / "fp32")["what_ran"]["lines"]["precision"] == "32-true"
    crafted = torch.load(checkpoint, weights_only=True) | {"trained_precision": "bf16-mixed; rm -rf ~"}
    torch.save(crafted, tmp_path / "crafted.ckpt")
    with pytest.raises(SystemExit, match=r"^error: .*trained_precision=bf16-mixed; rm -rf ~: not a precision"):
        run_here("test.py", tmp_path / "crafted", *paths[:2], f"ckpt_path={tmp_path / 'crafted.ckpt'}")


def test_the_same_seed_gives_the_same_metrics_and_another_seed_does_not(
    trained: Path, data_dir: Path, tmp_path: Path
) -> None:
    paths = [f"paths.data_dir={data_dir}", f"paths.data_mirror={MIRROR}"]
    run("train.py", *paths, *TRAINED, f"hydra.run.dir={tmp_path / 'again'}")
    assert read_metrics(tmp_path / "again")["metrics"] == read_metrics(trained)["metrics"]
    other_seed = [override for override in TRAINED if not override.startswith("seed=")] + ["seed=8", "test=false"]
    run("train.py", *paths, *other_seed, f"hydra.run.dir={tmp_path / 'other'}")
    other = read_metrics(tmp_path / "other")
    assert other["metrics"]["train/loss"] != read_metrics(trained)["metrics"]["train/loss"]
    assert "test/acc" not in other["metrics"] and other["tested"] is None  # test=false skips the test


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "data", "options"),
    [
        ("net2", "mnist", []),
        ("net3", "mnist", []),
        ("net2", "fashion", []),
        ("net3", "fashion", []),
        # The optional layers and the training-batch augmentation, all at once.
        ("net3", "fashion", ["model.batch_norm=true", "model.dropout=0.2", "data.shift=2", "data.flip=true"]),
    ],
)
def test_each_network_learns_each_dataset(
    model: str, data: str, options: list[str], paths: list[str], tmp_path: Path
) -> None:
    run_here(
        "train.py",
        tmp_path / "run",
        *paths,
        f"model={model}",
        f"data={data}",
        *options,
        "data.val_size=200",
        "data.batch_size=20",
        "optimizer=adam",
        "optimizer.lr=0.003",
        "trainer.max_epochs=3",
        "logger=csv",
    )
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        epoch_losses = [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert len(epoch_losses) == 3 and epoch_losses[-1] < 0.6 * epoch_losses[0]
    assert read_metrics(tmp_path / "run")["metrics"]["test/acc"] > 0.5  # chance is 0.1


@pytest.mark.slow  # the test report draws its figures
def test_an_experiment_without_validation_keeps_last_and_tests_the_final_weights(
    paths: list[str], tmp_path: Path
) -> None:
    run_here("train.py", tmp_path / "run", *paths, "experiment=seed_mnist", "trainer.max_epochs=1",
             "++trainer.limit_train_batches=0.5")  # fmt: skip
    result = read_metrics(tmp_path / "run")
    assert set(result["metrics"]) == METRICS - {"val/loss", "val/acc"}
    assert result["tested"] == "final weights" and result["best"] is None
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["last.ckpt"]
    assert result["settings"]["experiment"] == "seed_mnist" and result["settings"]["val_size"] == 0
    assert result["steps"] == 5  # half of the 10 batches of 100 images


@pytest.mark.slow
def test_an_unknown_option_lists_the_available_ones(paths: list[str]) -> None:
    proc = run("train.py", *paths, "model=net9", check=False)
    assert proc.returncode != 0
    assert "Could not find 'model/net9'" in proc.stderr and "net2" in proc.stderr and "net3" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("given", "message"),
    [
        (
            ["experiment=mnist_fast", "model=net3"],
            "error: experiment=mnist_fast chooses model=net2 and sets its settings: model=net3 would be net3's file "
            "under them, recorded as net3. Change its settings instead (model.…=…), or leave out experiment=",
        ),
        (["experiment=fashion_fast", "optimizer=adam"], "error: experiment=fashion_fast chooses optimizer=sgd and"),
        (["experiment=[mnist_fast,fashion_fast]"], "error: experiment=['mnist_fast', 'fashion_fast'] must name one"),
    ],
)
def test_an_experiment_keeps_the_model_and_optimizer_it_sets(
    given: list[str], message: str, paths: list[str], tmp_path: Path
) -> None:
    """A model= or optimizer= other than the experiment's would take the experiment's settings and be recorded by its
    own name; a choice the experiment sets nothing of (data=, scheduler=) is the user's to make."""
    proc = run("train.py", *paths, *given, f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(message)
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_a_user_error_is_printed_alone_without_a_traceback(tmp_path: Path) -> None:
    """As the script prints it; which settings are refused, and with what message, test_reliability checks."""
    empty = ["paths.data_mirror=null", "data.download=false", f"paths.data_dir={tmp_path / 'empty'}"]
    proc = run("train.py", *empty, f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: MNIST files missing from")
    assert_no_result(tmp_path / "run", line)


@pytest.mark.slow
def test_a_refused_command_leaves_no_directory_where_hydra_run_dir_named_a_new_one(
    paths: list[str], tmp_path: Path
) -> None:
    """Refused before it starts, a run leaves nothing in the directory Hydra made for it: the same command, mended,
    then runs there (it would be refused as a run that never got as far as its metrics.json)."""
    for refused in ("optimizer.lr=0", "trainer.precision=17"):
        proc = run("train.py", *paths, *QUICK, refused, f"hydra.run.dir={tmp_path / 'run' / 'deeper'}", check=False)
        assert proc.returncode == 1 and proc.stderr.startswith("error: ") and not (tmp_path / "run").exists()
    # The default directory, outputs/train/runs/<time> below a paths.log_dir that did not exist: none of it left.
    proc = run("train.py", *paths, *QUICK, "optimizer.lr=0", f"paths.log_dir={tmp_path / 'logs'}", check=False)
    assert proc.returncode == 1 and not (tmp_path / "logs").exists()
    kept = tmp_path / "mine"
    (kept / "notes").mkdir(parents=True)  # a folder of the user's own, not empty: nothing of it is removed
    proc = run("train.py", *paths, *QUICK, "optimizer.lr=0", f"hydra.run.dir={kept}", check=False)
    assert proc.returncode == 1 and (kept / "notes").is_dir()
    (tmp_path / "empty").mkdir()  # the user's too, though empty
    proc = run("train.py", *paths, *QUICK, "optimizer.lr=0", f"hydra.run.dir={tmp_path / 'empty'}", check=False)
    assert proc.returncode == 1 and (tmp_path / "empty").is_dir()


def test_a_directory_that_holds_a_sweep_takes_no_run(tmp_path: Path) -> None:
    """Hydra's basic sweeper records a sweep in multirun.yaml, an Optuna search does not: its summary and results
    say a sweep lives there too."""
    for name in ("multirun.yaml", "summary.csv", "optimization_results.yaml"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x").touch()
        assert rundir.holds_a_sweep(tmp_path) and rundir.holds_a_run(tmp_path)
        with pytest.raises(UserError, match=r"already holds a sweep: choose another hydra\.run\.dir"):
            rundir.check_new(tmp_path, "train")
        shutil.rmtree(tmp_path / name)
    assert not rundir.holds_a_sweep(tmp_path)


@pytest.mark.slow
def test_test_py_refuses_a_trainer_setting_lightning_refuses_in_one_line(trained: Path, tmp_path: Path) -> None:
    last = trained / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit, match=r"^error: trainer: Precision 17 is invalid\. Allowed precision values"):
        run_here("test.py", tmp_path / "run", f"ckpt_path={last}", "trainer.precision=17")


def test_test_py_refuses_a_missing_or_broken_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"error: ckpt_path=.*no such file"):
        run_here("test.py", tmp_path / "run", f"ckpt_path={tmp_path / 'nope.ckpt'}")
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=re.escape(f"error: ckpt_path={broken} cannot be read")):
        run_here("test.py", tmp_path / "run", f"ckpt_path={broken}")


@pytest.mark.slow
def test_under_ddp_each_rank_trains_on_its_own_shard_and_one_rank_writes_results(
    paths: list[str], tmp_path: Path
) -> None:
    shards = tmp_path / "shards"
    learns = ["data.val_size=200", "trainer.max_epochs=2", "optimizer=adam", "optimizer.lr=0.003"]
    run(
        "train.py",
        *paths,
        *learns,
        "trainer=ddp_cpu",
        "data.batch_size=25",  # per process: a global batch of 50, as in the single-process run below
        "+callbacks.shards._target_=tests.callbacks.ShardRecorder",
        f"+callbacks.shards.out_dir={shards}",
        f"hydra.run.dir={tmp_path / 'ddp'}",
    )
    rank0, rank1 = (set(json.loads((shards / f"rank{r}.json").read_text())) for r in (0, 1))
    assert len(rank0) == len(rank1) == 400 and not rank0 & rank1  # 800 training images, split in two
    ddp = read_metrics(tmp_path / "ddp")
    assert set(ddp["metrics"]) == METRICS
    assert not (tmp_path / "outputs").exists(), "the second process must not start a run directory of its own"
    # Event files are named events.out.tfevents.<time>.<host>.<pid>.<n>: rank zero's process alone wrote them.
    writers = {path.name.split(".")[-2] for path in (tmp_path / "ddp" / "tensorboard").rglob("events.out.tfevents.*")}
    assert len(writers) == 1

    run("train.py", *paths, *learns, "data.batch_size=50", f"hydra.run.dir={tmp_path / 'single'}")
    single = read_metrics(tmp_path / "single")["metrics"]["test/acc"]
    # Same global batch, other data order: equal within the noise of 200 test images after 2 epochs.
    assert ddp["metrics"]["test/acc"] > 0.5 and single > 0.5 and abs(ddp["metrics"]["test/acc"] - single) < 0.1


def test_test_py_names_what_it_needs_and_refuses_settings_it_would_ignore(trained: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"error: test\.py needs ckpt_path="):
        run_here("test.py", tmp_path / "a")
    ckpt = f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}"
    with pytest.raises(SystemExit, match=r"error: test\.py rebuilds network, data and scoring .* checkpoint: model"):
        run_here("test.py", tmp_path / "b", ckpt, "+model.channels=[16,32]")
    with pytest.raises(SystemExit, match=r"from the checkpoint: classifier settings cannot change them"):
        run_here("test.py", tmp_path / "c", ckpt, "+classifier.flip_average=false")


def test_the_test_report_can_leave_out_its_image_grids(
    trained: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ckpt = f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}"
    report = ["callbacks.test_report.samples=0", "callbacks.test_report.misclassified=0"]
    run_here("test.py", tmp_path, ckpt, *report, "callbacks.test_report.confused_pairs=500",
             f"paths.data_dir={data_dir}")  # fmt: skip
    assert "most confused pairs" in capsys.readouterr().out and read_metrics(tmp_path)["status"] == "finished"
    assert (tmp_path / "confusion_matrix.png").is_file() and not (tmp_path / "misclassified.png").exists()


def test_a_run_without_our_callbacks_tests_the_final_weights(paths: list[str], tmp_path: Path) -> None:
    run_here("train.py", tmp_path / "run", *paths, *QUICK, "callbacks=none", "logger=csv")
    result = read_metrics(tmp_path / "run")
    assert result["tested"] == "final weights" and result["best"] is None and "test/acc" in result["metrics"]
    assert not (tmp_path / "run" / "architecture.md").exists()


@pytest.mark.slow
def test_the_entry_scripts_leave_their_imports_out_of_the_collectors_scans() -> None:
    """train.py and test.py pause the garbage collector while importing, then freeze what the imports made and turn
    it on again (cnn_exp/run.py: setup): a full collection then skips them, during the run and at exit."""
    probe = "import gc, {}; print(gc.isenabled(), gc.get_freeze_count())"
    for script in ("train", "test"):
        out = subprocess.run([sys.executable, "-c", probe.format(script)], cwd=ROOT, capture_output=True, text=True)
        enabled, frozen = out.stdout.split()
        assert enabled == "True" and int(frozen) > 100_000, out.stderr[-2000:]
