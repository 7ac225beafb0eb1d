"""logger=mlflow and logger=wandb (cnn_exp/trackers.py): refused in one line where the package is missing (as on CI,
which installs requirements.txt only), and, where it is installed, a real run whose database or offline run files
hold the run's name, its settings under the config's own keys, and its metrics."""

import json
import re
import struct
import textwrap
from pathlib import Path

import pytest

from tests.conftest import NO_FIGURES, QUICK, run, start

# mlflow 3.17 with SQLAlchemy 2.1, reading the database in the tests: a deprecation that is theirs.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
# train.py run as `python -c` with the package made unimportable, as where it is not installed.
WITHOUT = textwrap.dedent("""
    import runpy, sys
    sys.modules[sys.argv[1]] = None
    sys.argv = ["train.py", *sys.argv[2:]]
    runpy.run_path("train.py", run_name="__main__")
""")
# What a single run is named: its model, data and start time.
NAME = re.compile(r"net2-mnist-\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d")
# Settings under the config's own keys, and the groups chosen; never Lightning's hparams names (net/channels).
PARAMS = {
    "model": "net2",
    "data": "mnist",
    "optimizer": "sgd",
    "model.channels": [6, 12],
    "model.kernel_size": 5,
    "optimizer.lr": 0.1,
    "data.batch_size": 100,
    "data.val_size": 200,
    "trainer.max_epochs": 1,
}
METRICS = ["train/acc", "val/acc", "val/loss", "test/acc", "test/loss", "test/class_acc/0", "test/class_acc/9"]


@pytest.mark.parametrize(
    ("package", "install"), [("mlflow", "pip install 'mlflow>=3.17'"), ("wandb", "pip install 'wandb>=0.31'")]
)
def test_a_tracker_that_is_not_installed_is_refused_in_one_line_naming_the_install(
    package: str, install: str, paths: list[str], tmp_path: Path
) -> None:
    child = start("python", package, f"logger={package}", *paths, *QUICK, code=WITHOUT)
    try:
        child.wait(timeout=300)
    finally:
        child.kill()
    proc = child.result()
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: logger={package} needs the {package} package, an optional install: {install}"
    ]
    # Refused before the run started: no run record, no database, no tracker files.
    outputs = tmp_path / "outputs"
    assert not list(outputs.rglob("metrics.json")) and not list(outputs.rglob("*.db"))
    assert not list(outputs.rglob("wandb"))


@pytest.mark.slow
def test_a_run_with_logger_mlflow_keeps_its_name_settings_metrics_and_report_in_a_sqlite_database(
    paths: list[str], tmp_path: Path
) -> None:
    pytest.importorskip("mlflow")  # an optional install: skipped where it is missing (CI)
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    run("train.py", "logger=mlflow", *paths, *QUICK, *NO_FIGURES, f"hydra.run.dir={run_dir}")
    database = tmp_path / "outputs" / "mlflow.db"
    assert database.is_file()
    client = MlflowClient(f"sqlite:///{database}")
    (found,) = client.search_runs([client.get_experiment_by_name("cnn-exp").experiment_id])
    assert NAME.fullmatch(found.info.run_name) and found.info.status == "FINISHED"
    assert found.data.tags["run_dir"] == str(run_dir)
    params = found.data.params
    assert {key: params.get(key) for key in PARAMS} == {key: str(value) for key, value in PARAMS.items()}
    assert not [key for key in params if "/" in key or key in ("batch_size", "lr", "net")]
    assert set(METRICS) <= set(found.data.metrics) and "epoch" not in found.data.metrics
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert found.data.metrics["test/acc"] == pytest.approx(metrics["test/acc"])
    # The run's report files are its artifacts, kept under paths.log_dir too.
    assert Path(found.info.artifact_uri).is_relative_to(tmp_path / "outputs")
    artifacts = {artifact.path for artifact in client.list_artifacts(found.info.run_id)}
    assert {"confusion_matrix.png", "per_class.csv", "curves.png", "config.yaml"} <= artifacts


@pytest.mark.slow
def test_parallel_sweep_jobs_share_one_new_mlflow_database_each_run_named_for_its_values(
    paths: list[str], tmp_path: Path
) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    # Two new jobs at once: each would create the database's tables (one failed: "duplicate column name").
    jobs = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "optimizer.lr=0.05,0.1"]
    run("train.py", "-m", "logger=mlflow", *paths, *QUICK, *NO_FIGURES, "test=false", *jobs)
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("cnn-exp").experiment_id])
    assert sorted((found.info.run_name, found.info.status) for found in found) == [
        ("lr=0.05", "FINISHED"),
        ("lr=0.1", "FINISHED"),
    ]


@pytest.mark.slow
def test_a_run_with_logger_wandb_writes_an_offline_run_with_its_name_settings_and_metrics(
    paths: list[str], tmp_path: Path
) -> None:
    pytest.importorskip("wandb")  # an optional install: skipped where it is missing (CI)
    run_dir = tmp_path / "run"
    run("train.py", "logger=wandb", *paths, *QUICK, *NO_FIGURES, f"hydra.run.dir={run_dir}")
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (records,) = offline.glob("run-*.wandb")
    found = wandb_run(records)
    assert NAME.fullmatch(found["name"])
    assert {key: found["config"].get(key) for key in PARAMS} == PARAMS
    assert not [key for key in found["config"] if "/" in key or key in ("batch_size", "lr", "net")]
    assert set(METRICS) <= set(found["summary"]) and "epoch" not in found["summary"]
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert found["summary"]["test/acc"] == pytest.approx(metrics["test/acc"])


@pytest.mark.slow
def test_a_resumed_run_continues_its_mlflow_and_wandb_runs(paths: list[str], tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient

    # 8 steps an epoch: stopped in the second epoch, after the first epoch's validation.
    stop = [
        "+callbacks.stop._target_=tests.callbacks.SignalAt",
        "+callbacks.stop.step=10",
        "+callbacks.stop.signal=SIGINT",
    ]
    two_epochs = [*paths, "data.val_size=200", "trainer.max_epochs=2", *NO_FIGURES]
    logged = ["logger=[mlflow,wandb]", f"hydra.run.dir={tmp_path / 'run'}"]
    assert run("train.py", *logged, *two_epochs, *stop, check=False).returncode == 130
    # Where the data is may change on resume: the MLflow run keeps the params it started with.
    moved = [f"paths.data_dir={tmp_path / 'moved'}", paths[1]]
    run("train.py", f"resume={tmp_path / 'run'}", *moved)
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("cnn-exp").experiment_id])
    assert NAME.fullmatch(found.info.run_name) and found.info.status == "FINISHED"
    assert [metric.step for metric in client.get_metric_history(found.info.run_id, "val/acc")] == [7, 15]
    # Two offline folders, one W&B run: the same id.
    assert len({folder.name.rsplit("-", 1)[1] for folder in (tmp_path / "run" / "wandb").glob("offline-run-*")}) == 1


def wandb_run(path: Path) -> dict:
    """The name, config and final summary in a W&B offline run file (`run-<id>.wandb`): W&B's records, as protocol
    buffers, in LevelDB's log format (32 KiB blocks of chunks, each a 7-byte header: checksum, length, type) after
    a 7-byte W&B header. Type 1 is a whole record, 2-4 its first, middle and last chunks."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data.startswith(b":W&B")
    found: dict = {"name": None, "config": {}, "summary": {}}
    position, chunks = 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's end too short for a header: padding
            position += 32768 - position % 32768
            continue
        length, kind = struct.unpack_from("<HB", data, position + 4)
        chunks += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(chunks)
            chunks = b""
            if record.HasField("run"):
                found["name"] = found["name"] or record.run.display_name
            for item in record.config.update:
                found["config"][item.key] = json.loads(item.value_json)
            for item in record.summary.update:
                found["summary"]["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return found
