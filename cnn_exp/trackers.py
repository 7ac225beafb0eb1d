"""Your own tracker: MLflow (`logger=mlflow`) or Weights & Biases (`logger=wandb`), through Lightning's own loggers.

Each run is named as TensorBoard names it (what the run is: `net2-mnist-<time>`, a sweep's job by the values it
varies), its params are the run's settings under the config's own keys (`model.channels`, `optimizer.lr`, and the
groups chosen: `model` net3) rather than Lightning's hparams names (`net/channels`, a bare `batch_size`), and its
metrics are the names the run logs (`val/acc`, `test/acc`, `test/class_acc/<class>`). A run continued with resume=
continues its tracker's run, as it does its TensorBoard run.

Both packages are optional installs: without one, its logger is refused in one line that says what to install,
before the run starts. docs/trackers.md: how to use each, and where their files go.
"""

import contextlib
import importlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock
from lightning.pytorch import loggers
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

from cnn_exp import record
from cnn_exp.errors import UserError, plain
from cnn_exp.tensorboard import run_name, setting_values

# What to install for each tracker: the versions this project was tested with (docs/trackers.md), and up.
INSTALL = {"mlflow": "pip install 'mlflow>=3.17'", "wandb": "pip install 'wandb>=0.31'"}
# The MLflow tag that says where the run's own files are: a resumed run finds its MLflow run by it.
RUN_DIR_TAG = "run_dir"
# The run directory's files an MLflow run keeps as artifacts: the curves, the test report, the layer table, the
# config (metrics.json is written after the loggers have finished).
ARTIFACTS = (".png", ".csv", ".md", ".yaml")


def require(package: str) -> None:
    """Refuse a tracker whose package is not installed, in one line that names the install command."""
    try:
        importlib.import_module(package)
    except ImportError:
        raise UserError(
            f"logger={package} needs the {package} package, an optional install: {INSTALL[package]}"
        ) from None


def run_params(config: Mapping[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """The run's settings under the config's own keys: those of its record (the groups chosen, the key settings, the
    command line: tensorboard.setting_values) and every value of the config groups in `config`, flattened
    (`model.channels`). Unset values and Hydra's own keys (`_target_`) are left out."""
    settings = (record.read(run_dir) or {}).get("settings", {})
    values = setting_values(settings) | dict(_flat(config))
    return {key: value for key, value in values.items() if value is not None}


def _flat(node: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in node.items():
        if str(key).startswith("_"):
            continue
        if isinstance(value, Mapping):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _plain(config: Any) -> dict[str, Any]:
    return plain(config) if OmegaConf.is_config(config) else dict(config or {})


class MLFlowLogger(loggers.MLFlowLogger):
    """Lightning's MLflow logger (conf/logger/mlflow.yaml: a SQLite database under outputs/), writing the run's own
    names and settings (see the module), tagged with its run directory. Lightning's `epoch` chart is left out (the
    curves are against steps), and as the run ends its report files (ARTIFACTS) are kept as its artifacts.

    `run_dir`: the run's directory; `config`: the config groups whose values are params; `resume`: the run directory
    a resumed run continues (train.py's resume=), whose MLflow run this one continues. `artifact_location`: where
    the experiment keeps its runs' artifacts, if this run creates it.
    """

    def __init__(
        self,
        run_dir: str,
        config: Mapping[str, Any],
        tracking_uri: str,
        experiment_name: str = "cnn-exp",
        artifact_location: str | None = None,
        resume: str | None = None,
        **kwargs: Any,
    ) -> None:
        require("mlflow")
        from mlflow.tracking import MlflowClient

        self._run_dir, self._config, self._started = str(run_dir), _plain(config), False
        # A new database gets its tables, and an experiment its row, from the first process that opens it: parallel
        # sweep jobs, all new, take turns (else one fails: "duplicate column name").
        with _one_at_a_time(tracking_uri):
            client = MlflowClient(tracking_uri)
            experiment = client.get_experiment_by_name(experiment_name)
            if experiment is None:
                client.create_experiment(experiment_name, artifact_location=artifact_location)
        run_id = _continued(client, experiment.experiment_id, self._run_dir) if resume and experiment else None
        super().__init__(
            experiment_name=experiment_name,
            run_name=None if run_id else run_name(),
            tracking_uri=tracking_uri,
            tags={RUN_DIR_TAG: self._run_dir},
            artifact_location=artifact_location,
            run_id=run_id,
            **kwargs,
        )

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:  # Lightning's hparams: the config's own keys instead
        # MLflow refuses a param logged again with another value: a resumed run (whose data may have moved, or run
        # on other threads) keeps those it started with.
        self._started = True
        logged = self.experiment.get_run(self.run_id).data.params
        super().log_hyperparams({k: v for k, v in run_params(self._config, self._run_dir).items() if k not in logged})

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._started = True
        super().log_metrics({key: value for key, value in metrics.items() if key != "epoch"}, step)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        # Lightning finalizes after fit and again after the test: the test report is there the second time.
        if self._started:
            for path in sorted(Path(self._run_dir).iterdir()):
                if path.suffix in ARTIFACTS and path.is_file():
                    self.experiment.log_artifact(self.run_id, str(path))
        super().finalize(status)


@contextlib.contextmanager
def _one_at_a_time(tracking_uri: str) -> Iterator[None]:
    """For a SQLite database (`sqlite:///<path>`), a lock beside it (`<path>.lock`) held meanwhile."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    database = Path(tracking_uri.removeprefix("sqlite:///").split("?")[0])
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{database}.lock"):
        yield


def _continued(client: Any, experiment_id: str, run_dir: str) -> str | None:
    """The MLflow run of the run in `run_dir` (by its RUN_DIR_TAG), marked running again; None where there is none."""
    quote = "'" if "'" not in run_dir else '"'
    if rank_zero_only.rank != 0 or quote in run_dir:  # only rank zero logs; a name with both quotes cannot be searched
        return None
    found = client.search_runs([experiment_id], f"tags.{RUN_DIR_TAG} = {quote}{run_dir}{quote}")
    if not found:
        return None
    client.update_run(found[0].info.run_id, status="RUNNING")
    return found[0].info.run_id


class WandbLogger(loggers.WandbLogger):
    """Lightning's Weights & Biases logger, offline by default (conf/logger/wandb.yaml): the run is written under
    `<run_dir>/wandb/`, without network, for `wandb sync` to upload later. It writes the run's own names and
    settings (see the module); Lightning's `epoch` chart is left out.

    `run_dir`, `config` and `resume` as for MLFlowLogger: a resumed run continues its W&B run (the same id).
    """

    def __init__(
        self,
        run_dir: str,
        config: Mapping[str, Any],
        project: str = "cnn-exp",
        offline: bool = True,
        resume: str | None = None,
        **kwargs: Any,
    ) -> None:
        require("wandb")
        import wandb

        # One process runs every job of a sweep (Hydra's basic launcher): the previous job's run ends here, else
        # Lightning would log this job into it.
        if wandb.run is not None:
            wandb.finish()
        self._run_dir, self._config = str(run_dir), _plain(config)
        run_id = _wandb_id(Path(run_dir)) if resume else None
        super().__init__(
            name=None if run_id else run_name(),
            save_dir=self._run_dir,
            id=run_id,
            offline=offline,
            project=project,
            **kwargs,
        )

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:  # Lightning's hparams: the config's own keys instead
        super().log_hyperparams(run_params(self._config, self._run_dir))

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics({key: value for key, value in metrics.items() if key != "epoch"}, step)


def _wandb_id(run_dir: Path) -> str | None:
    """The id of the W&B run already in this run directory: its folder `wandb/offline-run-<time>-<id>` (`run-…`
    online), the newest if there are several."""
    folders = [path for path in (run_dir / "wandb").glob("*run-*-*") if path.is_dir() and not path.is_symlink()]
    if not folders:
        return None
    return max(folders, key=lambda folder: folder.name.rsplit("-", 2)[1]).name.rsplit("-", 1)[1]
