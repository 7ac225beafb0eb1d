"""The LightningModule: trains one network with cross-entropy and logs loss and accuracy per split."""

import inspect
import logging
import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from cnn_exp import build, checkpoints, precision, record
from cnn_exp.data import InMemoryDataset
from cnn_exp.errors import UserError, is_number

log = logging.getLogger(__name__)

# Training steps whose predictions the train accuracy counts in one update, and whose losses the train loss adds up in
# one. A torchmetrics update costs 0.05-0.1 ms inside a step, 2-4 % of Network3's at batch 40.
COUNT_EVERY = 32


class Classifier(L.LightningModule):
    """Owns the loss, metrics, optimizer and scheduler; the network itself is a plain `nn.Module`.

    Beyond the notebook's plain cross-entropy: `label_smoothing` for the training loss; `flip_average`
    (Fashion-MNIST) and `shift_average` to score each evaluated image with its mirror and its shifted copies
    (`scores`); `norm_lr_scale` and `norm_weight_decay`, batch norm's own learning rate (a multiple of the
    optimizer's) and weight decay, in a parameter group of their own.

    It takes the configs of the network, optimizer and scheduler as plain dicts and builds them itself, so the
    hyperparameters saved in a checkpoint are plain values: the checkpoint alone rebuilds the model, and it
    loads under torch's safe `weights_only` default. It builds them only from the classes that
    `cnn_exp.build.BUILDS` allows, from plain values, never with Hydra's instantiate: settings read back from
    a checkpoint cannot name code, even where a path to this class skipped the checkpoint's own check.
    """

    # The precision the checkpoint it was loaded from trained in (cnn_exp/predict.py: from_checkpoint), if it says.
    trained_precision: str | None = None

    def __init__(
        self,
        net: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
        flip_average: bool = False,
        shift_average: int = 0,
        norm_lr_scale: float = 1.0,
        norm_weight_decay: float | None = None,
    ) -> None:
        super().__init__()
        lr = optimizer.get("lr", 1)
        if not is_number(lr) or not math.isfinite(lr) or lr <= 0:
            raise UserError(f"optimizer.lr={lr} must be positive (and finite)")
        build.check_classifier_settings(
            {
                "label_smoothing": label_smoothing,
                "flip_average": flip_average,
                "shift_average": shift_average,
                "norm_lr_scale": norm_lr_scale,
                "norm_weight_decay": norm_weight_decay,
            }
        )
        # Optimizer and scheduler are built when training starts: their settings are refused now, before any work.
        build.check_optimizer_and_scheduler(optimizer, scheduler, norm_lr_scale)
        self.save_hyperparameters()
        self.net = build.build(net, "net", where="model")
        self._train_forward = self.forward  # compiled when training starts, with the network's compile=true
        # One blank image: the model summary then shows every layer's input and output shape.
        self.example_input_array = torch.zeros(1, *self.net.input_shape)
        classes = self.net.num_classes
        # One set of metrics per split, so their running states never mix. The confusion matrices feed per-class
        # accuracy and the reports that callbacks draw (cnn_exp/callbacks.py). Inputs come from our own network
        # and data, so the metrics skip their per-call checks, which cost time and, on a GPU, a sync every step;
        # a NaN loss then shows as a NaN mean instead of being dropped from it.
        self.train_loss, self.val_loss, self.test_loss = (MeanMetric(nan_strategy="disable") for _ in range(3))
        self.train_acc, self.val_acc, self.test_acc = (
            MulticlassAccuracy(classes, average="micro", validate_args=False) for _ in range(3)
        )
        self.val_confusion = MulticlassConfusionMatrix(classes, validate_args=False)
        self.test_confusion = MulticlassConfusionMatrix(classes, validate_args=False)
        # Saved with the weights, so a run resumed mid-epoch reports the same epoch means as one never stopped.
        self.train_loss.persistent(True)
        self.train_acc.persistent(True)
        self._predicted: list[tuple[torch.Tensor, torch.Tensor]] = []  # steps' (predictions, labels) not counted yet
        # Steps' (mean loss, images) not added to train_loss yet. Unlike the predictions' integer counts, a sum of
        # floats depends on how it is grouped: a checkpoint keeps these as they are (on_save_checkpoint), so that a run
        # resumed from it groups them as the run that never stopped did, and its epoch's loss is the same to the bit.
        self._losses: list[tuple[torch.Tensor, int]] = []
        # Counted before any state dict is taken (Lightning's checkpoints), so that it holds them all; dropped when one
        # is loaded, whose counts replace everything this module had seen.
        self.register_state_dict_pre_hook(_count_before_saving)
        self.register_load_state_dict_pre_hook(_drop_before_loading)
        self._rng_state: dict[str, Any] = {}  # a resumed checkpoint's random state, set when training starts

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """What evaluation and prediction classify by: the network's logits, or with `flip_average` and
        `shift_average` the log of the mean class probabilities over the image's views (views_averaged): its mirror (a
        mirrored garment is the same garment), its copies shifted a pixel or two."""
        flip, shift = self.hparams.flip_average, self.hparams.get("shift_average", 0)
        if not (flip or shift):
            return self(images)
        return views_averaged(self, images, flip, shift)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        try:
            logits = self._train_forward(images)
        except ValueError as err:  # torch's batch norm, training on a batch of one image whose maps are 1×1
            if "Expected more than 1 value per channel" not in str(err):
                raise
            raise UserError(
                f"batch norm cannot normalize a training batch of one image whose maps are 1×1 (step "
                f"{self.global_step}): choose a data.batch_size (with data.val_size) that leaves no batch of one "
                "image, or a network whose maps stay larger (model.pool_first=false)"
            ) from None
        # The mean of per-image losses: cross_entropy's own mean reduction gives other gradient bits under label
        # smoothing, and the recipes' documented results would no longer repeat to the bit.
        loss = F.cross_entropy(logits, labels, reduction="none", label_smoothing=self.hparams.label_smoothing).mean()
        # Every step only gathers what the epoch's metrics count: a `self.log` call costs about as much as this small
        # network's forward pass, so the step loss is logged only on the steps the loggers write (log_every_n_steps).
        self._losses.append((loss.detach(), len(labels)))
        if len(self._losses) >= COUNT_EVERY:
            self._add_losses()
        self._predicted.append((logits.detach().argmax(dim=1), labels))
        if len(self._predicted) >= COUNT_EVERY:
            self._count_predictions()
        logging_step = (self.global_step + 1) % self.trainer.log_every_n_steps == 0
        if logging_step:
            self.log("train/loss_step", loss, prog_bar=True)
        # A loss that is no longer finite fails the run at once instead of finishing with a network of NaNs.
        # The check waits for the device, so on a GPU it runs on logging steps only.
        if (logging_step or loss.device.type == "cpu") and not math.isfinite(loss.item()):
            raise UserError(
                f"training diverged: the loss became {loss.item()} at step {self.global_step} (epoch "
                f"{self.current_epoch}). Lower {self._rates()} or choose another optimizer."
            )
        return loss

    def _rates(self) -> str:
        """The settings that make the learning rates, as the divergence message names them."""
        rates = [f"optimizer.lr (now {self.hparams.optimizer.get('lr')})"]
        for group, key in (("optimizer", "muon_lr"), ("scheduler", "max_lr")):
            value = (self.hparams.get(group) or {}).get(key)
            if value is not None:
                rates.append(f"{group}.{key} (now {value})")
        if self.hparams.get("norm_lr_scale", 1.0) != 1:
            rates.append(f"classifier.norm_lr_scale (now {self.hparams.norm_lr_scale})")
        return ", ".join(rates[:-1]) + f" or {rates[-1]}" if len(rates) > 1 else rates[0]

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, self.val_loss, self.val_acc, self.val_confusion)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, self.test_loss, self.test_acc, self.test_confusion)

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """Class probabilities for a batch of images framed and normalized like the data (cnn_exp/predict.py)."""
        return self.scores(batch).softmax(dim=1)

    def configure_optimizers(self) -> Any:
        settings = self.hparams.optimizer
        try:  # torch refuses some optimizers' parameter groups (LBFGS) only as it builds them
            optimizer = build.build(settings, "optimizer", self.parameter_groups(), where="optimizer")
        except ValueError as err:
            raise UserError(
                f"optimizer ({build.short(settings)}) is refused by torch: {build.first_line(err)}"
            ) from None
        if not self.hparams.scheduler:
            return optimizer
        per_batch = build.steps_per_batch(self.hparams.scheduler)
        steps = self._run_steps() if per_batch else 2
        try:  # a one-cycle schedule divides by its first phase's length in steps, which may round to none
            scheduler = build.build(
                self.hparams.scheduler, "scheduler", optimizer, where="scheduler", total_steps=steps
            )
        except (ValueError, ZeroDivisionError) as err:
            raise UserError(
                f"scheduler ({build.short(self.hparams.scheduler)}) cannot span this run's {steps} steps: "
                f"{build.first_line(err)} (give more steps, or another scheduler.pct_start)"
            ) from None
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step" if per_batch else "epoch"},
        }

    def _run_steps(self) -> int:
        """How many optimizer steps the run takes, which a schedule over steps (one-cycle, triangular) spans: only the
        Trainer knows (epochs × batches, limits included). Before one is attached (a checkpoint checked before training
        starts) any length will do."""
        if self._trainer is None:
            return 2
        steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(steps):
            raise UserError(
                f"scheduler ({build.short(self.hparams.scheduler)}) spans the run's steps, and this run has no end: "
                "set trainer.max_epochs or trainer.max_steps"
            )
        return int(steps)

    def parameter_groups(self) -> list[dict[str, Any]] | Any:
        """The parameters as the optimizer takes them: one group, or with `norm_lr_scale` / `norm_weight_decay` a
        second one of the normalization layers' weights and biases with their own learning rate and weight decay."""
        scale, decay = self.hparams.get("norm_lr_scale", 1.0), self.hparams.get("norm_weight_decay")
        if scale == 1 and decay is None:
            return self.parameters()
        norms = torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm
        normed = {id(p) for m in self.modules() if isinstance(m, norms) for p in m.parameters(recurse=False)}
        if not normed:
            log.warning("classifier.norm_lr_scale and norm_weight_decay: the network has no normalization layer")
            return self.parameters()
        lr = self.hparams.optimizer.get("lr", build.default_of(self.hparams.optimizer, "optimizer", "lr"))
        norm_group: dict[str, Any] = {"params": [p for p in self.parameters() if id(p) in normed], "lr": lr * scale}
        if decay is not None:
            norm_group["weight_decay"] = decay
        return [{"params": [p for p in self.parameters() if id(p) not in normed]}, norm_group]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning does not keep the random state; dropout and augmentation draw from it (from the GPU's own
        # generator on a GPU), so a resumed run continues from it. Tensors only: the file loads under weights_only.
        checkpoint["rng_state"] = torch.get_rng_state()
        # Which DataModule the settings in datamodule_hyper_parameters rebuild (test.py, predict=, export=): a name
        # that is looked up, never imported unless a config of the run names the class too (cnn_exp/build.py).
        if (datamodule := getattr(self._trainer, "datamodule", None)) is not None:
            checkpoint[build.DATA_TARGET] = build.dotted(type(datamodule))
        if torch.cuda.is_available():
            checkpoint["cuda_rng_state"] = torch.cuda.get_rng_state_all()
        if self._trainer is not None and str(self._trainer.precision) in precision.KNOWN:  # test.py tests in it
            checkpoint[precision.CHECKPOINT_KEY] = str(self._trainer.precision)
        if self._losses:
            losses, images = zip(*self._losses, strict=True)
            checkpoint[checkpoints.PENDING_LOSSES] = {
                "losses": torch.stack(losses).cpu(),
                "images": torch.tensor(images),
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_checkpoint(checkpoint)
        # Set when training starts, not now: between here and the first step Lightning traces the network for
        # TensorBoard's graph in training mode, and its dropout draws from the generator.
        self._rng_state = {key: checkpoint[key] for key in ("rng_state", "cuda_rng_state") if key in checkpoint}
        self._losses = checkpoints.pending_losses(checkpoint)  # replacing any of a fit stopped in this process

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another network, optimizer or schedule than this run's, naming what differs.

        Also called before training starts (cnn_exp.resume.Start.check), so that a refusal leaves
        the run's record as it was.
        """
        saved, ours = checkpoint.get("hyper_parameters", {}).get("net", {}), self.hparams.net
        # A setting absent from an older checkpoint had the network's default then.
        signature = inspect.signature(type(self.net)).parameters.items()
        defaults = {name: parameter.default for name, parameter in signature}
        # Lists and tuples alike: a default written as a tuple (init=()) is the config's [].
        then, now = ({k: _as_list(v) for k, v in {**defaults, **d}.items()} for d in (saved, ours))
        # How the network runs (memory format, compilation) may change between runs; what it is may not.
        differences = [
            f"model.{key}: {then.get(key)} in the checkpoint, {now.get(key)} here"
            for key in sorted((set(then) | set(now)) - {"channels_last", "compile"})
            if then.get(key) != now.get(key)
        ]
        if differences:
            raise UserError(f"the checkpoint holds another network than this run's: {'; '.join(differences)}")
        # Lightning continues the checkpoint's optimizer and schedule, state and settings alike: settings given now
        # that differ would be recorded for this run but never used (a schedule's length included).
        hyper = checkpoint.get("hyper_parameters", {})
        for group in ("optimizer", "scheduler"):
            then, now = hyper.get(group), self.hparams.get(group)
            stored = "optimizer_states" in checkpoint and group in hyper
            if stored and build.what_to_build(then) != build.what_to_build(now):
                raise UserError(
                    f"the checkpoint continues its own {group} ({build.short(then)}), not this run's "
                    f"({build.short(now)}): give the same {group} settings, or train a new run from the start"
                )
        # Batch norm's own learning rate and weight decay live in the optimizer's state too.
        for key, default in (("norm_lr_scale", 1.0), ("norm_weight_decay", None)):
            then, now = hyper.get(key, default), self.hparams.get(key, default)
            if "optimizer_states" in checkpoint and then != now:
                raise UserError(
                    f"the checkpoint continues its own optimizer, with classifier.{key}={then}, not this run's "
                    f"{now}: give the same, or train a new run from the start"
                )
        # torch's random states, which training restores as it starts (on_train_start): refused now, as torch would.
        if "rng_state" in checkpoint:
            try:
                torch.Generator().set_state(checkpoint["rng_state"])
            except (TypeError, RuntimeError, ValueError):
                raise UserError(
                    "the checkpoint's rng_state is not a state of torch's random number generator"
                ) from None
        cuda = checkpoint.get("cuda_rng_state", [])
        if not isinstance(cuda, list | tuple) or not all(
            isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.dim() == 1 for state in cuda
        ):
            raise UserError(
                "the checkpoint's cuda_rng_state is not a list of torch's CUDA random states (byte tensors)"
            )

    def on_fit_start(self) -> None:
        # model.init=[whiten]: conv1 from the training images' patches, once, in a run from its beginning (a resumed
        # one has its weights).
        init_from_data = getattr(self.net, "init_from_data", None)
        if init_from_data is not None and "whiten" in getattr(self.net, "init", ()) and not self.trainer.ckpt_path:
            init_from_data(self._training_images(WHITEN_IMAGES).to(self.device))

    def _training_images(self, count: int) -> torch.Tensor:
        """The first `count` training images: an InMemoryDataModule's as it holds them (normalized, not augmented),
        any other DataModule's from the batches of the loader Lightning trains with. Never a loader of its own: a
        DataModule's state (its position in the epoch) follows the loader Lightning made."""
        datamodule = self.trainer.datamodule
        if isinstance(getattr(datamodule, "train_set", None), InMemoryDataset):
            return datamodule.train_set.tensors[0][:count]
        _ = self.trainer.estimated_stepping_batches  # makes Lightning load its train loader now, as a schedule does
        images, taken = [], 0
        for batch in self.trainer.train_dataloader:
            images.append(batch[0])
            taken += len(batch[0])
            if taken >= count:
                break
        return torch.cat(images)[:count]

    def on_train_start(self) -> None:
        self._check_schedule_length()
        state, self._rng_state = self._rng_state, {}
        self._losses = [(loss.to(self.device), images) for loss, images in self._losses]  # a checkpoint's, on the CPU
        if "rng_state" in state:
            torch.set_rng_state(state["rng_state"])
        if "cuda_rng_state" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng_state"])
        # Only the training steps' forward is compiled, and only now: the layer table and the TensorBoard graph
        # trace the eager network (they cannot trace through dynamo), and evaluation is too short to repay it.
        # The network itself stays as it is, so its parameter names, and so checkpoints, do not change.
        if getattr(self.net, "compile_for_training", False):
            self._train_forward = torch.compile(self.net.forward)

    def _check_schedule_length(self) -> None:
        """A schedule over steps continued from a checkpoint keeps the length it was made with (torch restores it):
        a run of another length would end its schedule early, with a traceback, or leave it unfinished."""
        for config in self.trainer.lr_scheduler_configs:
            total = getattr(config.scheduler, "total_steps", None)
            if total is None or total == self.trainer.estimated_stepping_batches:
                continue
            steps = int(self.trainer.estimated_stepping_batches)
            if not self.trainer.ckpt_path:
                raise UserError(
                    f"scheduler.total_steps={total}, but this run takes {steps} steps: leave it null (the run's steps)"
                )
            raise UserError(
                f"the checkpoint's {type(config.scheduler).__name__} schedule spans {total} steps, this run {steps} "
                "(trainer.max_epochs, data.batch_size, limits): continue it with the settings it was made with, or "
                "start a new run"
            )

    def on_train_epoch_start(self) -> None:
        # Lightning skips this hook when it resumes mid-epoch, where the saved sums must carry on. A checkpoint
        # taken at an epoch's end still holds that epoch's sums: they must not leak into the next one.
        self.train_loss.reset()
        self.train_acc.reset()
        self._predicted.clear()
        self._losses.clear()

    def on_train_epoch_end(self) -> None:
        self._add_losses()
        self._count_predictions()
        # Logged metric objects are computed (over all ranks under DDP) and reset by Lightning.
        self.log_dict({record.TRAIN_LOSS: self.train_loss, record.TRAIN_ACC: self.train_acc}, prog_bar=True)

    def _count_predictions(self) -> None:
        """Update the train accuracy with the steps' predictions gathered since it was last updated."""
        if self._predicted:
            predictions, labels = zip(*self._predicted, strict=True)
            self._predicted = []
            # Also reached from a checkpoint saved during validation, under its inference mode: counts made there
            # would become inference tensors, which a later in-place update refuses.
            with torch.inference_mode(False):
                self.train_acc.update(torch.cat(predictions), torch.cat(labels))

    def train_metrics(self) -> dict[str, float]:
        """The epoch's train loss and accuracy from the sums this module holds, with the steps gathered since they were
        last added (a checkpoint saved as validation ended holds some): a run that had finished training when it
        stopped reports its last epoch from them."""
        self._add_losses()
        self._count_predictions()
        return {record.TRAIN_LOSS: float(self.train_loss.compute()), record.TRAIN_ACC: float(self.train_acc.compute())}

    def _add_losses(self) -> None:
        """Add the steps' losses gathered since they were last added to the epoch's train loss: each batch's mean once
        per image, so that an epoch's smaller last batch weighs as its images. Not as MeanMetric's weights, which
        torchmetrics 1.9 replaces with ones under nan_strategy="disable" (torchmetrics issue 3434)."""
        if self._losses:
            losses, self._losses = self._losses, []
            self.train_loss.update(torch.cat([loss.expand(images) for loss, images in losses]))

    def on_validation_epoch_start(self) -> None:
        self.val_confusion.reset()

    def on_validation_epoch_end(self) -> None:
        self.log_dict({record.VAL_LOSS: self.val_loss, record.VAL_ACC: self.val_acc}, prog_bar=True)

    def on_test_epoch_start(self) -> None:
        self.test_confusion.reset()

    def on_test_epoch_end(self) -> None:
        self.log_dict({record.TEST_LOSS: self.test_loss, record.TEST_ACC: self.test_acc})

    def _evaluate(
        self,
        batch: tuple[torch.Tensor, torch.Tensor],
        loss: MeanMetric,
        accuracy: MulticlassAccuracy,
        confusion: MulticlassConfusionMatrix,
    ) -> torch.Tensor:
        """Update one split's metrics; the logits go on to callbacks as the step's outputs."""
        images, labels = batch
        logits = self.scores(images)
        loss.update(F.cross_entropy(logits, labels, reduction="none"))
        accuracy.update(logits, labels)
        confusion.update(logits.argmax(dim=1), labels)
        return logits


def _count_before_saving(module: Classifier, prefix: str, keep_vars: bool) -> None:
    module._count_predictions()


def _drop_before_loading(module: Classifier, *args: Any) -> None:
    module._predicted = []


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def views_averaged(
    net: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, flip: bool, shift: int = 0
) -> torch.Tensor:
    """The log of the mean of `net`'s class probabilities over each image's views (valid logits): the image, its
    mirror with `flip`, and with `shift` both (each) moved `shift` pixels down-right and up-left, the edge
    repeated into the gap (airbench's multi-crop test-time augmentation)."""
    views = [images]
    if shift:
        height, width = images.shape[-2:]
        padded = F.pad(images, [shift] * 4, mode="replicate")
        views += [padded[..., :height, :width], padded[..., 2 * shift :, 2 * shift :]]
    if flip:
        views += [view.flip(-1) for view in views]
    scores = torch.stack([net(view).log_softmax(dim=1) for view in views])
    return scores.logsumexp(dim=0) - math.log(len(views))


def flip_averaged(net: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """The log of the mean of `net`'s class probabilities for each image and its mirror (valid logits)."""
    return views_averaged(net, images, flip=True)


# How many training images model.init=[whiten] measures patches on: enough for a 5×5 kernel's 25×25 covariance.
WHITEN_IMAGES = 1024
