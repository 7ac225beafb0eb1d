"""The LightningModule: plain hyperparameters, shapes in the summary, and a training step for any padding."""

import io
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.model_summary import ModelSummary

from cnn_exp import classifier
from cnn_exp.classifier import Classifier
from cnn_exp.data import MNISTDataModule
from cnn_exp.errors import UserError
from tests.conftest import MIRROR, composed

SGD = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}


def net(name: str, **overrides: object) -> dict:
    return composed("model", name, **overrides)


def plain(value: object) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


def test_hyperparameters_are_plain_values() -> None:
    model = Classifier(net=net("net3"), optimizer=SGD, scheduler={})
    assert plain(dict(model.hparams)) and model.hparams.net["channels"] == [6, 12, 24]


def test_the_summary_shows_each_layers_shapes_for_one_image() -> None:
    summary = ModelSummary(Classifier(net=net("net2"), optimizer=SGD), max_depth=2)
    shapes = dict(zip(summary.layer_names, zip(summary.in_sizes, summary.out_sizes, strict=True), strict=True))
    assert shapes["net.conv1"] == ([1, 1, 28, 28], [1, 6, 24, 24])
    assert shapes["net.conv1_pool"] == ([1, 6, 24, 24], [1, 6, 12, 12])
    assert shapes["net.conv2_pool"] == ([1, 12, 8, 8], [1, 12, 4, 4])
    assert shapes["net.flatten"] == ([1, 12, 4, 4], [1, 192])
    assert shapes["net.out"] == ([1, 60], [1, 10])


@pytest.fixture(scope="module")
def mnist(tmp_path_factory: pytest.TempPathFactory) -> MNISTDataModule:
    data = MNISTDataModule("MNIST", str(tmp_path_factory.mktemp("data")), str(MIRROR), batch_size=50, val_size=100)
    data.prepare_data()
    return data


@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("name", ["net2", "net3"])
def test_any_padding_trains(mnist: MNISTDataModule, name: str, padding: int, tmp_path: Path) -> None:
    model = Classifier(net=net(name, padding=padding), optimizer=SGD)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = L.Trainer(
        fast_dev_run=3, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path
    )
    trainer.fit(model, datamodule=mnist)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert 0 <= trainer.callback_metrics["val/acc"] <= 1
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_label_smoothing_is_the_loss_trained_on(mnist: MNISTDataModule, tmp_path: Path) -> None:
    class Loss(L.Callback):  # the loss of the batch about to be trained on, as the step must compute it
        def on_train_batch_start(self, trainer: L.Trainer, module: Classifier, batch: tuple, batch_idx: int) -> None:
            images, labels = batch
            with torch.no_grad():
                logits = module(images)
            self.smoothed = F.cross_entropy(logits, labels, label_smoothing=0.2)
            self.plain = F.cross_entropy(logits, labels)

        def on_train_batch_end(self, trainer: L.Trainer, module: Classifier, outputs: dict, *args: object) -> None:
            self.trained = outputs["loss"]

    loss = Loss()
    model = Classifier(net=net("net2"), optimizer=SGD, label_smoothing=0.2)
    trainer = L.Trainer(
        fast_dev_run=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=[loss],
    )  # fmt: skip
    trainer.fit(model, datamodule=mnist)
    assert torch.allclose(loss.trained, loss.smoothed) and not torch.allclose(loss.trained, loss.plain)


def test_train_accuracy_holds_every_step_whenever_it_is_read(
    mnist: MNISTDataModule, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted in groups of steps, yet a state dict taken mid-group (a checkpoint) and the epoch's train/acc hold every
    step's predictions, against a count made here of what the network predicted as each step began."""
    monkeypatch.setattr(classifier, "COUNT_EVERY", 4)

    class Count(L.Callback):
        correct, mid_group = 0, None

        def on_train_batch_start(self, trainer: L.Trainer, module: Classifier, batch: tuple, batch_idx: int) -> None:
            images, labels = batch
            with torch.no_grad():  # Network2 has no dropout: the step's forward pass gives these logits
                self.correct += int(module(images).argmax(dim=1).eq(labels).sum())

        def on_train_batch_end(self, trainer: L.Trainer, module: Classifier, *args: object) -> None:
            if trainer.global_step == 6:  # 4 counted, 2 gathered since
                self.mid_group = (module.state_dict()["train_acc.tp"].item(), self.correct)

    count = Count()
    model = Classifier(net=net("net2"), optimizer=SGD)
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=7, limit_val_batches=0, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[count],
    )  # fmt: skip
    trainer.fit(model, datamodule=mnist)
    assert count.mid_group[0] == count.mid_group[1] > 0
    assert trainer.callback_metrics["train/acc"].item() == pytest.approx(count.correct / (7 * 50))


def test_a_loaded_state_replaces_predictions_gathered_before_it() -> None:
    """A fit stopped between two counts, then resumed in the same process from a checkpoint: the checkpoint's counts
    stand for every step before it, so what the stopped fit had gathered must not be counted on top of them."""
    stopped, saved = Classifier(net=net("net2"), optimizer=SGD), Classifier(net=net("net2"), optimizer=SGD)
    saved.train_acc.update(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 0]))
    stopped._predicted.append((torch.tensor([4, 4]), torch.tensor([4, 4])))
    stopped.load_state_dict(saved.state_dict())
    stopped._count_predictions()  # as the epoch's end, or the next checkpoint, counts them
    assert (stopped.train_acc.tp.item(), stopped.train_acc.fp.item()) == (2, 1)


def test_the_epochs_train_loss_is_the_mean_over_its_images(tmp_path: Path) -> None:
    """The steps' losses are added up in groups, yet the epoch's train/loss weighs each step by its images: the last
    batch, smaller than the others, counts for its images only."""
    data = MNISTDataModule("MNIST", str(tmp_path / "data"), str(MIRROR), batch_size=64, val_size=0)

    class Losses(L.Callback):
        def __init__(self) -> None:
            self.steps: list[tuple[float, int]] = []

        def on_train_batch_end(
            self, trainer: L.Trainer, module: Classifier, outputs: dict, batch: tuple, i: int
        ) -> None:
            self.steps.append((outputs["loss"].item(), len(batch[1])))

    losses = Losses()
    trainer = L.Trainer(
        max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[losses],
    )  # fmt: skip
    trainer.fit(Classifier(net=net("net2"), optimizer=SGD), datamodule=data)
    sizes = [images for _, images in losses.steps]
    assert len(set(sizes)) == 2 and sizes[-1] < sizes[0]  # a smaller last batch
    weighted = sum(loss * images for loss, images in losses.steps) / sum(sizes)
    per_step = sum(loss for loss, _ in losses.steps) / len(sizes)
    assert trainer.callback_metrics["train/loss"].item() == pytest.approx(weighted, rel=1e-6)
    assert per_step != pytest.approx(weighted, rel=1e-4)  # the weighting shows at this tolerance


def test_losses_not_yet_added_travel_in_the_checkpoint_and_a_resumed_epoch_adds_them_up_alike(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sum of floats depends on its grouping (in float32, 1 + 2**-24 + 2**-24 added as one group differs from 1, then
    the other two): an epoch resumed from a checkpoint taken between two additions must group its steps' losses as the
    epoch that never stopped, to the bit."""
    monkeypatch.setattr(classifier, "COUNT_EVERY", 3)
    steps = [(torch.tensor(1.0), 50), (torch.tensor(2.0**-24), 50), (torch.tensor(2.0**-24), 50)]

    def added_up(model: Classifier, losses: list) -> Classifier:
        model._losses += losses
        model._add_losses()
        return model

    whole = added_up(Classifier(net=net("net2"), optimizer=SGD), steps)
    stopped = Classifier(net=net("net2"), optimizer=SGD)
    stopped._losses.append(steps[0])
    checkpoint = {"hyper_parameters": dict(stopped.hparams), "state_dict": stopped.state_dict()}
    stopped.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, buffer := io.BytesIO())
    buffer.seek(0)
    resumed = Classifier(net=net("net2"), optimizer=SGD)
    resumed.on_load_checkpoint(torch.load(buffer))  # as Lightning restores: the hook, then the state dict
    resumed.load_state_dict(checkpoint["state_dict"])
    resumed = added_up(resumed, steps[1:])
    assert resumed.train_loss.compute().item() == whole.train_loss.compute().item()
    # The values do depend on the grouping: adding the first step up on its own gives another mean.
    regrouped = added_up(added_up(Classifier(net=net("net2"), optimizer=SGD), steps[:1]), steps[1:])
    assert regrouped.train_loss.compute().item() != whole.train_loss.compute().item()


def test_a_checkpoint_taken_before_its_epoch_ended_reports_the_epoch_with_the_losses_it_kept() -> None:
    """A checkpoint saved as validation ends holds steps' losses not yet added: a run that had finished training when
    it stopped reports its last epoch's train loss from the checkpoint, those steps included, each by its images."""
    stopped = Classifier(net=net("net2"), optimizer=SGD)
    stopped._losses += [(torch.tensor(1.0), 3), (torch.tensor(4.0), 1)]
    stopped._predicted.append((torch.tensor([1, 2]), torch.tensor([1, 0])))
    checkpoint = {"hyper_parameters": dict(stopped.hparams), "state_dict": stopped.state_dict()}
    stopped.on_save_checkpoint(checkpoint)
    resumed = Classifier(net=net("net2"), optimizer=SGD)
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(checkpoint["state_dict"])
    assert resumed.train_metrics() == {"train/loss": 1.75, "train/acc": 0.5}


def test_predictions_counted_under_inference_mode_leave_ordinary_counts() -> None:
    """A checkpoint saved as validation ends (under its inference mode) counts the gathered predictions: the counts
    must stay tensors that training can go on updating in place."""
    model = Classifier(net=net("net2"), optimizer=SGD)
    model._predicted.append((torch.tensor([1, 2]), torch.tensor([1, 0])))
    with torch.inference_mode():
        model.state_dict()
    assert not any(getattr(model.train_acc, name).is_inference() for name in ("tp", "fp", "tn", "fn"))
    model.train_acc.tp += 1


def test_flip_averaging_classifies_by_the_mean_of_an_image_and_its_mirror() -> None:
    torch.manual_seed(0)
    images = torch.randn(8, 1, 28, 28)
    model = Classifier(net=net("net3"), optimizer=SGD, flip_average=True).eval()
    with torch.no_grad():
        mean = (model(images).softmax(1) + model(images.flip(-1)).softmax(1)) / 2
        assert torch.allclose(model.scores(images).softmax(1), mean, atol=1e-6)
        assert torch.allclose(model.predict_step(images, 0), mean, atol=1e-6)
        assert torch.allclose(model.scores(images.flip(-1)), model.scores(images), atol=1e-5)
        assert not torch.allclose(model(images).softmax(1), mean, atol=1e-6)  # the mirror does change the answer
        plain = Classifier(net=net("net3"), optimizer=SGD).eval()
        assert torch.equal(plain.scores(images), plain(images))


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"label_smoothing": 1.0}, "classifier.label_smoothing=1.0 must be a number at least 0 and below 1"),
        ({"label_smoothing": -0.1}, "classifier.label_smoothing=-0.1 must be"),
        ({"flip_average": "yes"}, "classifier.flip_average='yes' must be true or false"),
    ],
)
def test_bad_classifier_settings_are_refused(setting: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        Classifier(net=net("net2"), optimizer=SGD, **setting)


def test_val_acc_is_the_share_of_validation_images_counted_right_independently(
    mnist: MNISTDataModule, tmp_path: Path
) -> None:
    """val/acc against a count made here, without torchmetrics: the network's top class against each label."""
    model = Classifier(net=net("net2"), optimizer={"_target_": "torch.optim.Adam", "lr": 0.003})
    trainer = L.Trainer(
        max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, datamodule=mnist)
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in mnist.val_dataloader():
            images, labels = mnist.on_after_batch_transfer((images, labels), 0)
            correct += int((model(images).argmax(dim=1) == labels).sum())
            total += len(labels)
    assert total == 100 and 10 < correct < 100  # learnt something, not everything: a wrong count would show
    assert trainer.callback_metrics["val/acc"].item() == pytest.approx(correct / total, abs=1e-6)
