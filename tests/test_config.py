"""Every option of every config group composes and builds what it names; the experiments hold the notebook's recipes."""

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import LambdaCallback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.profilers import SimpleProfiler
from omegaconf import DictConfig, OmegaConf

from cnn_exp import build
from cnn_exp.assemble import BATCH_HOOKS, Unprofiled, model_and_data, skip_absent_batch_hooks
from cnn_exp.assemble import callbacks as _callbacks
from cnn_exp.assemble import instantiate_each as _instantiate_each
from cnn_exp.assemble import trainer as _trainer
from cnn_exp.classifier import Classifier
from cnn_exp.errors import UserError
from cnn_exp.errors import plain as plain_values
from cnn_exp.signals import StopOnSignal
from tests.conftest import MNIST_SHAPE, ROOT, make_image_folder

CONF = ROOT / "conf"
GROUPS = ["data", "model", "optimizer", "scheduler", "trainer", "logger", "callbacks", "experiment", "hparams_search"]


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


@pytest.fixture
def config(tmp_path: Path):
    def compose_train(*overrides: str, name: str = "train", hydra: bool = False) -> DictConfig:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            given = [f"paths.output_dir={tmp_path}", f"paths.log_dir={tmp_path}", *overrides]
            return compose(name, overrides=given, return_hydra_config=hydra)

    return compose_train


def test_the_groups_offer_the_documented_options() -> None:
    assert {"mnist", "fashion"} <= set(options("data"))
    assert {"net2", "net3"} <= set(options("model"))
    assert {"sgd", "adam", "adamw"} <= set(options("optimizer"))
    assert "none" in options("scheduler") and len(options("scheduler")) >= 2
    assert {"default", "cpu", "gpu"} <= set(options("trainer"))
    assert {"tensorboard", "csv"} <= set(options("logger"))
    assert {"seed_mnist", "seed_fashion"} <= set(options("experiment"))
    assert (CONF / "callbacks" / "default.yaml").exists() and (CONF / "paths" / "default.yaml").exists()


def classifier(cfg: DictConfig) -> Classifier:
    return Classifier(
        net=build.with_data_shape(plain_values(cfg.model), MNIST_SHAPE),
        optimizer=plain_values(cfg.optimizer),
        scheduler=plain_values(cfg.scheduler),
        **plain_values(cfg.classifier),
    )


# One option of each group in the quick loop (composing takes ~0.5 s); every option in the whole suite.
@pytest.mark.parametrize(
    ("group", "option"),
    [pytest.param(g, o, marks=[pytest.mark.slow] if i else []) for g in GROUPS for i, o in enumerate(options(g))],
)
def test_every_option_composes_and_builds(config, tmp_path: Path, group: str, option: str) -> None:
    """Each option builds what it names, and what it builds offers what the project needs of it (docs/extend.md):
    a config of one's own in conf/ that does keeps this test green."""
    if group == "logger" and option in ("mlflow", "wandb"):
        pytest.importorskip(option, reason="an optional install (docs/trackers.md)")
    cfg = config(f"{group}={option}")
    if OmegaConf.is_missing(cfg.data, "root"):  # a folder of images (data=folder): one generated
        cfg = config(f"{group}={option}", f"data.root={make_image_folder(tmp_path / 'images', per_class=4)}")
    model, data = model_and_data(cfg)  # as train.py builds them: the data interface checked, shapes from the data
    net = model.net
    assert model(torch.zeros(2, *net.input_shape)).shape == (2, net.num_classes)  # the model interface
    assert isinstance(data, L.LightningDataModule) and len(data.classes) == net.num_classes
    assert tuple(data.input_shape) == tuple(net.input_shape)
    optimizers = model.configure_optimizers()
    optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers
    assert isinstance(optimizer, get_class(cfg.optimizer._target_))
    # A one-cycle schedule starts below the optimizer's lr, which is its peak.
    assert optimizer.param_groups[0].get("max_lr", optimizer.param_groups[0]["lr"]) == cfg.optimizer.lr
    if cfg.scheduler:
        assert isinstance(optimizers["lr_scheduler"]["scheduler"], get_class(cfg.scheduler._target_))
    built = _instantiate_each(cfg.callbacks, "callbacks")
    assert all(isinstance(c, L.Callback) for c in built)
    assert [type(c) for c in built] == [get_class(n._target_) for n in cfg.callbacks.values() if n]
    loggers = _instantiate_each(cfg.logger, "logger")
    assert [type(logger) for logger in loggers] == [get_class(n._target_) for n in (cfg.logger or {}).values() if n]
    assert all(isinstance(logger, Logger) for logger in loggers)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        pytest.skip(f"{group}={option} needs a CUDA GPU to build its Trainer")
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_epochs == cfg.trainer.max_epochs


def test_lightnings_switches_turn_our_callbacks_off_too(config) -> None:
    """trainer.enable_*=false (which Lightning refuses beside such callbacks) and a run without loggers."""
    cfg = config(*(f"++trainer.enable_{name}=false" for name in ("progress_bar", "checkpointing", "model_summary")))
    built = _callbacks(cfg, loggers=[])
    assert {type(c).__name__ for c in built} == {"UntrainedScores", "ConfusionMatrix", "TestReport", "EpochTable"}
    trainer = instantiate(cfg.trainer, callbacks=built, logger=False)
    assert trainer.progress_bar_callback is None and trainer.checkpoint_callback is None
    cfg = config("~logger")
    assert "LearningRateMonitor" not in {type(c).__name__ for c in _callbacks(cfg, loggers=[])}
    cfg = config()
    assert len(_callbacks(cfg, loggers=_instantiate_each(cfg.logger, "logger"))) == len(cfg.callbacks)


def test_the_trainer_profiles_only_when_a_profiler_is_chosen(config, tmp_path: Path) -> None:
    """None chosen: Lightning's hook calls go through one shared context that does nothing (cnn_exp.assemble), not
    a new one each; trainer.profiler=simple: Lightning's profiler."""
    quiet = _trainer(config("~logger"), StopOnSignal(tmp_path))
    assert isinstance(quiet.profiler, Unprofiled)
    assert quiet.profiler.profile("[Callback]EpochTable.on_train_batch_end") is quiet.profiler.profile(
        "run_training_batch"
    )
    assert (
        type(_trainer(config("~logger", "trainer.profiler=simple"), StopOnSignal(tmp_path)).profiler) is SimpleProfiler
    )


def test_lightning_calls_only_the_batch_hooks_a_callback_defines(config, tmp_path: Path) -> None:
    """Those left to Callback's empty ones are None on each callback (Lightning's dispatcher passes over them); those
    it defines still run at every step. With a profiler chosen, every hook stays, for it to time."""
    quiet = _trainer(config("~logger"), StopOnSignal(tmp_path))
    bar = quiet.progress_bar_callback
    assert bar.on_train_batch_end is not None and bar.on_before_backward is None
    assert all(
        getattr(c, hook) is None for c in quiet.callbacks for hook in BATCH_HOOKS if type(c).__name__ == "EpochTable"
    )
    profiled = _trainer(config("~logger", "trainer.profiler=simple"), StopOnSignal(tmp_path))
    assert all(callable(getattr(c, hook)) for c in profiled.callbacks for hook in BATCH_HOOKS)

    class Steps(L.Callback):
        def __init__(self) -> None:
            self.ended = 0

        def on_train_batch_end(self, *args: object) -> None:
            self.ended += 1

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.layer(batch).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    steps, started = Steps(), []
    given = LambdaCallback(on_train_batch_start=lambda *args: started.append(1))  # hooks set on the instance
    skip_absent_batch_hooks([steps, given])
    assert steps.on_train_batch_start is None and steps.on_train_batch_end is not None
    assert given.on_train_batch_start is not None and given.on_train_batch_end is None
    trainer = L.Trainer(
        max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        default_root_dir=tmp_path, callbacks=[steps, given],
    )  # fmt: skip
    trainer.fit(Tiny(), torch.utils.data.DataLoader(torch.randn(6, 2), batch_size=2))
    assert steps.ended == 3 and len(started) == 3


def test_the_slurm_launcher_asks_for_what_the_trainer_will_use(config) -> None:
    cfg = config("hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2", hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes) == (4, 4, 2)
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.accelerator == "gpu"


def test_the_optuna_searches_tune_on_validation_only(config) -> None:
    for overrides, study in [
        (["hparams_search=optuna"], "mnist_net2"),
        (["hparams_search=optuna", "data=fashion", "model=net3"], "fashion_net3"),
        (["hparams_search=mnist_optuna"], "mnist_net2"),
        (["hparams_search=fashion_optuna"], "fashion_net3"),
    ]:
        cfg = config(*overrides, hydra=True)
        assert (cfg.hydra.sweeper.study_name, len(cfg.model.channels)) == (study, 3 if study.endswith("net3") else 2)
        assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "maximize"
        assert {"optimizer", "optimizer.lr", "model.padding", "data.batch_size"} <= set(cfg.hydra.sweeper.params)
        assert cfg.optimized_metric == "val/acc" and cfg.data.val_size > 0 and cfg.test is False


def test_test_config_needs_only_a_checkpoint(config) -> None:
    cfg = config("ckpt_path=some.ckpt", name="test")
    assert cfg.ckpt_path == "some.ckpt" and cfg.trainer._target_ == "lightning.pytorch.Trainer"


def test_seed_mnist_is_the_notebooks_recipe(config) -> None:
    cfg = config("experiment=seed_mnist")
    assert cfg.model.channels == [6, 12] and cfg.model.padding == 0
    assert (cfg.data.dataset, cfg.data.mean, cfg.data.std, cfg.data.batch_size) == ("MNIST", 0.1307, 0.3081, 100)
    assert cfg.data.val_size == 0, "trained on all 60,000 training images"
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.lr == 0.1 and cfg.optimizer.momentum == 0
    assert not cfg.scheduler and cfg.trainer.max_epochs == 10


def test_seed_fashion_is_the_notebooks_recipe(config) -> None:
    cfg = config("experiment=seed_fashion")
    assert cfg.model.channels == [6, 12, 24] and cfg.model.padding == [0, 0, 1] and cfg.model.kernel_size == [5, 5, 2]
    assert (cfg.data.dataset, cfg.data.mean, cfg.data.std, cfg.data.batch_size) == ("FashionMNIST", 0.0, 1.0, 40)
    assert cfg.data.val_size == 0
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.lr == 0.1 and cfg.optimizer.momentum == 0
    assert not cfg.scheduler


@pytest.mark.parametrize("experiment", ["seed_mnist", "seed_fashion"])
def test_the_notebooks_recipes_have_no_augmentation_batch_norm_or_dropout(config, experiment: str) -> None:
    cfg = config(f"experiment={experiment}")
    assert cfg.data.shift == 0 and cfg.data.flip is False
    assert cfg.model.batch_norm is False and cfg.model.dropout == 0


def test_fashion_best_stays_in_network3s_family_and_trains_on_every_image(config) -> None:
    """Chosen on validation runs (benchmarks/ablation.py), it trains on all 60,000 images and tests its final
    weights: its schedule ends at 0.07 of its peak, and the last epoch was the best on validation."""
    cfg = config("experiment=fashion_best")
    assert len(cfg.model.channels) == 3 and len(cfg.model.hidden) == 2  # 3 conv + 3 FC, as Network3
    assert cfg.data.val_size == 0 and cfg.callbacks.model_checkpoint.monitor is None
    assert cfg.scheduler._target_.endswith("OneCycleLR") and cfg.trainer.max_epochs == 30
    assert cfg.data.dataset == "FashionMNIST" and cfg.data.flip in (True, "alternate") and cfg.data.shift > 0
    net = classifier(cfg).net
    assert sum(isinstance(layer, torch.nn.Conv2d) for layer in net.modules()) == 3
    assert sum(isinstance(layer, torch.nn.Linear) for layer in net.modules()) == 3


def test_mnist_best_stays_in_network2s_family_shifts_but_never_mirrors_digits(config) -> None:
    cfg = config("experiment=mnist_best")
    assert len(cfg.model.channels) == 2 and len(cfg.model.hidden) == 2  # 2 conv + 3 FC, as Network2
    assert cfg.data.val_size > 0 and cfg.callbacks.model_checkpoint.monitor == "val/acc"
    assert cfg.data.dataset == "MNIST" and cfg.data.flip is False and cfg.data.shift > 0
    # The DataModule and the network build from it, as train.py builds them.
    assert instantiate(cfg.data).hparams.shift == cfg.data.shift
    net = classifier(cfg).net
    assert sum(isinstance(layer, torch.nn.Conv2d) for layer in net.modules()) == 2
    assert sum(isinstance(layer, torch.nn.Linear) for layer in net.modules()) == 3


@pytest.mark.parametrize(
    ("experiment", "convs", "dataset"), [("mnist_fast", 2, "MNIST"), ("fashion_fast", 3, "FashionMNIST")]
)
def test_the_fast_recipes_stay_in_their_family_and_train_on_every_image(
    config, experiment: str, convs: int, dataset: str
) -> None:
    """The issue's rules: the network family stays, nothing but the training images is trained on, digits are never
    mirrored; all 60,000 training images, the final weights tested (their settings were chosen on validation runs)."""
    cfg = config(f"experiment={experiment}")
    assert cfg.data.dataset == dataset and cfg.data.val_size == 0
    assert cfg.data.flip is False if dataset == "MNIST" else cfg.data.flip == "alternate"
    net = classifier(cfg).net
    assert sum(isinstance(layer, torch.nn.Conv2d) for layer in net.modules()) == convs
    assert sum(isinstance(layer, torch.nn.Linear) for layer in net.modules()) == 3


@pytest.mark.parametrize(("experiment", "convs"), [("mnist_small", 2), ("fashion_small", 3)])
def test_the_small_recipes_stay_in_their_family_under_100k_parameters(config, experiment: str, convs: int) -> None:
    cfg = config(f"experiment={experiment}")
    model = classifier(cfg)
    assert sum(isinstance(layer, torch.nn.Conv2d) for layer in model.net.modules()) == convs
    assert sum(isinstance(layer, torch.nn.Linear) for layer in model.net.modules()) == 3
    assert sum(p.numel() for p in model.net.parameters()) < 100_000
    assert cfg.data.val_size > 0 and cfg.callbacks.model_checkpoint.monitor == "val/acc" and "ema" in cfg.callbacks
    # Mirrors only where a mirrored image is the same class: Fashion-MNIST's garments, never MNIST's digits.
    fashion = cfg.data.dataset == "FashionMNIST"
    assert cfg.data.flip is fashion and model.hparams.flip_average is fashion


def test_command_line_overrides_reach_the_objects(config) -> None:
    cfg = config("model=net3", "data=fashion", "model.padding=[2,2,1]", "optimizer=adam", "optimizer.lr=0.003")
    model = classifier(cfg)
    assert model.net.conv1.padding == (2, 2) and model.net.conv3.padding == (1, 1)
    assert model.configure_optimizers().param_groups[0]["lr"] == 0.003
    assert instantiate(cfg.data).hparams.dataset == "FashionMNIST"


def test_an_object_the_config_builds_that_refuses_its_settings_is_one_error_line() -> None:
    """The Trainer, a logger or a callback that cannot be imported or refuses a value: one UserError naming the
    config key, in the error's own words (Hydra would print its own lines); an error inside a class stays an error."""
    with pytest.raises(UserError, match=r"^trainer: Precision 17 is invalid\. Allowed precision values"):
        build.instantiated(OmegaConf.create({"_target_": "lightning.pytorch.Trainer", "precision": 17}), "trainer")
    with pytest.raises(UserError, match=r"^logger\.mine: Error loading 'nowhere\.Logger': ModuleNotFoundError"):
        build.instantiated(OmegaConf.create({"_target_": "nowhere.Logger"}), "logger.mine")
    with pytest.raises(UserError, match=r"^callbacks\.stop: .*missing 1 required positional argument: 'monitor'"):
        build.instantiated(
            OmegaConf.create({"_target_": "lightning.pytorch.callbacks.EarlyStopping"}), "callbacks.stop"
        )
    with pytest.raises(InstantiationException):  # a bug in a class: its traceback finds it
        build.instantiated(OmegaConf.create({"_target_": "builtins.open", "file": "/nonexistent/x"}), "callbacks.x")


def test_the_network_a_run_builds_is_checked_by_one_forward_pass(config, monkeypatch: pytest.MonkeyPatch) -> None:
    """model_and_data hands the built network to build.check_forward (tests/test_extend.py: what that refuses)."""
    checked = []
    monkeypatch.setattr(build, "check_forward", lambda net, where, device: checked.append((net, where, device)))
    model, _ = model_and_data(config("model=net3"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert checked == [(model.net, "model._target_=cnn_exp.net.ConvNet", device)]
