"""The speed-run methods (docs/recipes.md): each does what it says, is off by default, refuses bad settings in one
line, and a run that uses them all resumes after a kill to the bit."""

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnn_exp import build, checkpoints
from cnn_exp.classifier import Classifier, views_averaged
from cnn_exp.data import EpochSampler, InMemoryDataset, MNISTDataModule
from cnn_exp.errors import UserError
from cnn_exp.lookahead import Lookahead
from cnn_exp.muon import ConvMuon
from cnn_exp.net import ConvNet
from tests.conftest import MIRROR, NO_FIGURES, QUICK, ROOT, read_metrics, run, run_here

SGD = {"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9}
NET = {"_target_": "cnn_exp.net.ConvNet", "channels": [8, 16], "kernel_size": 3, "padding": 1, "batch_norm": True}
# Every method at once, on Fashion-MNIST's 800 training images in batches of 50: 16 steps an epoch.
ALL_METHODS = [
    "data=fashion",
    "model=net3",
    "model.channels=[8,16,16]",
    "model.kernel_size=3",
    "model.padding=1",
    "model.batch_norm=true",
    "model.bn_momentum=0.4",
    "model.init=[whiten,dirac]",
    "scheduler=triangular",
    "optimizer=muon",
    "optimizer.momentum=0.9",
    "optimizer.nesterov=true",
    "classifier.norm_lr_scale=8",
    "classifier.label_smoothing=0.2",
    "classifier.flip_average=true",
    "classifier.shift_average=1",
    "data.flip=alternate",
    "callbacks=[default,lookahead]",
    "callbacks.lookahead.every=3",
    "data.val_size=200",
    "data.batch_size=50",
    "trainer.max_epochs=2",
    "seed=5",
    "callbacks.step_checkpoint.every_n_train_steps=5",
    *NO_FIGURES,
]


def test_every_method_is_off_by_default() -> None:
    net = ConvNet(batch_norm=True)
    assert net.init == [] and net.conv1_bn.momentum == 0.1
    model = Classifier(net=NET, optimizer=SGD)
    assert len(model.configure_optimizers().param_groups) == 1
    assert Lookahead().every == 5 and MNISTDataModule().hparams.flip is False


def test_dirac_init_starts_each_later_conv_as_the_identity_of_its_inputs() -> None:
    torch.manual_seed(0)
    net = ConvNet(channels=[4, 8, 8], kernel_size=3, padding=1, init=["dirac"])
    random = ConvNet(channels=[4, 8, 8], kernel_size=3, padding=1)
    x = torch.randn(2, 4, 14, 14)
    # conv2 (4 → 8): its first 4 filters copy the 4 input channels; the other 4 keep a random init.
    assert torch.equal(nn.functional.conv2d(x, net.conv2.weight[:4], padding=1), x)
    assert net.conv2.weight[4:].abs().sum() > 0
    # conv3 (8 → 8): all of it the identity; conv1 is left as torch initializes it.
    y = torch.randn(2, 8, 7, 7)
    assert torch.equal(nn.functional.conv2d(y, net.conv3.weight, padding=1), y)
    assert not torch.equal(random.conv3.weight, net.conv3.weight)


def test_whitening_init_decorrelates_conv1s_outputs_on_the_training_patches() -> None:
    torch.manual_seed(0)
    # Smooth, strongly correlated images: neighbouring pixels nearly equal, as in real images.
    images = nn.functional.avg_pool2d(torch.randn(256, 1, 34, 34), 5, stride=1) * 3 + 0.5
    net = ConvNet(channels=[12, 8], kernel_size=3, padding=0, batch_norm=True, init=["whiten"])
    before = net.conv1.weight.clone()
    net.init_from_data(images, eps=0.0)
    outputs = nn.functional.conv2d(images, net.conv1.weight)  # N × 12 × 28 × 28
    positive = outputs[:, 0::2].permute(1, 0, 2, 3).reshape(6, -1)  # the first filter of each pair
    covariance = positive @ positive.T / positive.shape[1]
    assert torch.allclose(covariance, torch.eye(6), atol=2e-3)  # unit variance, uncorrelated
    assert torch.equal(net.conv1.weight[1::2], -net.conv1.weight[0::2])  # each paired with its negative
    # Without whiten in model.init it changes nothing.
    plain = ConvNet(channels=[12, 8], kernel_size=3)
    weights = plain.conv1.weight.clone()
    plain.init_from_data(images)
    assert torch.equal(plain.conv1.weight, weights) and not torch.equal(before, net.conv1.weight)


def test_more_filters_than_directions_keep_their_random_init() -> None:
    net = ConvNet(channels=[20, 8], kernel_size=3, init=["whiten"])
    random = net.conv1.weight[18:].clone()
    net.init_from_data(torch.rand(64, 1, 28, 28))
    assert torch.equal(net.conv1.weight[18:], random)  # 9 directions, 18 filters set


def test_batch_norm_momentum_reaches_every_norm() -> None:
    net = ConvNet(channels=[4, 8, 8], batch_norm=True, bn_momentum=0.4, kernel_size=3, padding=1)
    assert [m.momentum for m in net.modules() if isinstance(m, nn.BatchNorm2d)] == [0.4, 0.4, 0.4]


def test_norm_parameters_get_their_own_learning_rate_and_weight_decay() -> None:
    model = Classifier(net=NET, optimizer=SGD | {"weight_decay": 5e-4}, norm_lr_scale=64, norm_weight_decay=0.0)
    rest, norms = model.configure_optimizers().param_groups
    expected = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert {id(p) for p in norms["params"]} == expected and len(expected) == 4
    assert norms["lr"] == pytest.approx(6.4) and norms["weight_decay"] == 0.0
    assert rest["lr"] == 0.1 and rest["weight_decay"] == 5e-4
    assert len(rest["params"]) + len(norms["params"]) == len(list(model.parameters()))


def test_a_one_cycle_peak_is_each_groups_own_learning_rate() -> None:
    schedule = {"_target_": "torch.optim.lr_scheduler.OneCycleLR", "max_lr": None, "total_steps": None}
    model = Classifier(net=NET, optimizer=SGD, scheduler=schedule, norm_lr_scale=10)
    configured = model.configure_optimizers()
    assert configured["lr_scheduler"]["interval"] == "step"  # stepped every batch, not every epoch
    assert [g["max_lr"] for g in configured["optimizer"].param_groups] == [0.1, pytest.approx(1.0)]
    epochly = Classifier(
        net=NET, optimizer=SGD, scheduler={"_target_": "torch.optim.lr_scheduler.StepLR", "step_size": 2}
    )
    assert epochly.configure_optimizers()["lr_scheduler"]["interval"] == "epoch"


def test_shift_average_scores_each_image_by_its_shifted_copies_too() -> None:
    net = ConvNet(channels=[4, 4], kernel_size=3, padding=1).eval()
    images = torch.randn(3, 1, 28, 28)
    padded = nn.functional.pad(images, [1, 1, 1, 1], mode="replicate")
    views = [images, padded[..., :28, :28], padded[..., 2:, 2:]]
    views += [v.flip(-1) for v in views]
    with torch.no_grad():
        expected = torch.stack([net(v).softmax(1) for v in views]).mean(0).log()
        assert torch.allclose(views_averaged(net, images, flip=True, shift=1), expected, atol=1e-6)
        three = torch.stack([net(v).softmax(1) for v in views[:3]]).mean(0).log()
        assert torch.allclose(views_averaged(net, images, flip=False, shift=1), three, atol=1e-6)
    assert torch.equal(padded[..., :28, :28][..., 1:, 1:], images[..., :27, :27])  # moved down-right by one


def test_alternating_flips_mirror_each_image_in_every_other_epoch() -> None:
    images = torch.arange(6 * 4.0).view(6, 1, 2, 2)
    dataset = InMemoryDataset(images, torch.arange(6))
    datamodule = MNISTDataModule("FashionMNIST", flip="alternate", seed=1)
    datamodule.train_set = dataset
    sampler = EpochSampler(6, seed=1, on_epoch=datamodule._alternating_flips())
    served = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        batch, labels = dataset.__getitems__(order)
        served.append(
            {
                int(label): bool(torch.equal(image, images[label].flip(-1)))
                for image, label in zip(batch, labels, strict=True)
            }
        )
    assert all(served[0][i] != served[1][i] for i in range(6))  # each image once each way in epochs 0 and 1
    assert served[0] == served[2] and 0 < sum(served[0].values()) < 6
    # The halves depend on the seed alone: a resumed run serves what an uninterrupted one would.
    again = MNISTDataModule("FashionMNIST", flip="alternate", seed=1)
    again.train_set = InMemoryDataset(images, torch.arange(6))
    again._alternating_flips()(2)
    assert torch.equal(again.train_set.mirrored, dataset.mirrored)
    other = MNISTDataModule("FashionMNIST", flip="alternate", seed=2)
    other.train_set = InMemoryDataset(torch.zeros(1000, 1, 1, 1), torch.zeros(1000, dtype=torch.long))
    other._alternating_flips()(0)
    mirrored = other.train_set.mirrored
    again.train_set = InMemoryDataset(torch.zeros(1000, 1, 1, 1), torch.zeros(1000, dtype=torch.long))
    again._alternating_flips()(0)
    assert not torch.equal(mirrored, again.train_set.mirrored) and 400 < int(mirrored.sum()) < 600


def test_lookahead_pulls_the_weights_back_to_the_slow_copy() -> None:
    layer = nn.Linear(3, 2)
    lookahead = Lookahead(every=2, alpha=0.25)
    trainer = SimpleNamespace(global_step=0)
    lookahead.on_train_start(trainer, layer)
    start = [p.detach().clone() for p in layer.parameters()]
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(1.0)
    trainer.global_step = 1
    lookahead.on_train_batch_end(trainer, layer, None, None, 0)  # not yet: every 2 steps
    assert all(torch.equal(p, s + 1) for p, s in zip(layer.parameters(), start, strict=True))
    trainer.global_step = 2
    lookahead.on_train_batch_end(trainer, layer, None, None, 1)
    assert all(torch.allclose(p, s + 0.25) for p, s in zip(layer.parameters(), start, strict=True))
    saved = lookahead.state_dict()
    restored = Lookahead(every=2, alpha=0.25)
    restored.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(restored.slow, lookahead.slow, strict=True))


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: ConvNet(init=["whitten"]), "model.init=['whitten'] must be a list of whiten, dirac"),
        (lambda: ConvNet(init="whiten"), "model.init=whiten must be a list"),
        (lambda: ConvNet(bn_momentum=0), "model.bn_momentum=0 must be above 0"),
        (lambda: MNISTDataModule("FashionMNIST", flip="sideways"), "data.flip=sideways must be true"),
        (lambda: MNISTDataModule("MNIST", flip="alternate"), "data.flip=alternate mirrors images"),
        (lambda: Classifier(net=NET, optimizer=SGD, shift_average=9), "classifier.shift_average=9 must be 0"),
        (lambda: Classifier(net=NET, optimizer=SGD, norm_lr_scale=0), "classifier.norm_lr_scale=0 must be"),
        (lambda: Classifier(net=NET, optimizer=SGD, norm_weight_decay=-1), "classifier.norm_weight_decay=-1 must"),
        (lambda: Lookahead(every=0), "callbacks.lookahead.every=0 must be"),
        (lambda: Lookahead(alpha=1.5), "callbacks.lookahead.alpha=1.5 must be"),
        (lambda: ConvMuon([nn.Parameter(torch.ones(2))], muon_momentum=1), "optimizer.muon_momentum=1 must be"),
        (lambda: ConvMuon([nn.Parameter(torch.ones(2))], ns_steps=0), "optimizer.ns_steps=0 must be a whole"),
        (lambda: ConvMuon([nn.Parameter(torch.ones(2))], ns_steps=100), "optimizer.ns_steps=100 must be a whole"),
        (lambda: ConvMuon([nn.Parameter(torch.ones(2))], muon_lr=float("nan")), "optimizer.muon_lr=nan must be a"),
        (lambda: ConvMuon([nn.Parameter(torch.ones(2))], momentum=0), "optimizer.nesterov=true needs optimizer.mom"),
        (lambda: ConvMuon([nn.Parameter(torch.ones(2))], nesterov=1), "optimizer.nesterov=1 must be true or false"),
    ],
)
def test_bad_settings_are_refused_in_one_line(make, error: str) -> None:
    with pytest.raises(UserError) as refused:
        make()
    assert str(refused.value).startswith(error), str(refused.value)


@pytest.mark.slow
def test_a_run_with_every_method_resumes_after_a_kill_to_the_bit(paths: list[str], tmp_path: Path) -> None:
    run_here("train.py", tmp_path / "whole", *paths, *ALL_METHODS)  # in this process: one start-up less
    killed = tmp_path / "killed"
    # A real SIGKILL at step 23: mid-epoch 1, three steps after step.ckpt was written at step 20.
    proc = run(
        "train.py",
        *paths,
        *ALL_METHODS,
        "+callbacks.kill._target_=tests.callbacks.SignalAt",
        "+callbacks.kill.step=23",
        f"hydra.run.dir={killed}",
        check=False,
    )
    assert proc.returncode == -9
    assert checkpoints.load(killed / "checkpoints" / "step.ckpt")["global_step"] == 20
    run("train.py", f"resume={killed}")
    resumed, whole = read_metrics(killed), read_metrics(tmp_path / "whole")
    assert resumed["status"] == "finished" and resumed["steps"] == whole["steps"] == 32
    assert resumed["metrics"] == whole["metrics"]  # identical, to the last bit, test included
    final = [
        checkpoints.load(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
        for run_dir in (killed, tmp_path / "whole")
    ]
    assert all(torch.equal(final[0][name], final[1][name]) for name in final[1])
    shutil.rmtree(killed)


@pytest.mark.slow
def test_a_one_cycle_checkpoint_continues_only_with_its_own_length(paths: list[str], tmp_path: Path) -> None:
    quick = [*paths, "scheduler=onecycle", "data.val_size=200", "data.batch_size=100", *NO_FIGURES]
    run_here("train.py", tmp_path / "first", *quick, "trainer.max_epochs=1", "test=false")
    state = checkpoints.load(tmp_path / "first" / "checkpoints" / "last.ckpt")
    assert state["lr_schedulers"][0]["total_steps"] == 8  # 800 images in batches of 100, one epoch
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit, match="the checkpoint's OneCycleLR schedule spans 8 steps, this run 16"):
        run_here("train.py", tmp_path / "more", *quick, "trainer.max_epochs=2", f"ckpt_path={last}")


def test_a_schedule_over_steps_needs_a_run_with_an_end(paths: list[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"spans the run's steps, and this run has no end: set trainer\.max_epochs"):
        run_here("train.py", tmp_path / "run", *paths, "scheduler=triangular", "trainer.max_epochs=-1", *QUICK[:1])


def test_a_checkpoint_without_nesterov_continues_under_the_sgd_config_that_names_it() -> None:
    """conf/optimizer/sgd.yaml lists nesterov (false) for optimizer.nesterov=true; checkpoints written before it said
    nothing of it, which is torch's same default: they still continue, and one of another value does not."""
    before = {"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0}
    assert build.what_to_build(before) == build.what_to_build(before | {"nesterov": False})
    assert build.what_to_build(before) != build.what_to_build(before | {"nesterov": True})
    assert build.what_to_build(before | {"_partial_": True}) == build.what_to_build(before)


@pytest.mark.slow
def test_a_checkpoint_from_before_the_methods_trains_on(paths: list[str], tmp_path: Path) -> None:
    """An older checkpoint names no init or bn_momentum: it had torch's defaults, which the config's [] and 0.1 are."""
    old = ROOT / "tests" / "data" / "checkpoints" / "62d8d00-net2-mnist-last.ckpt"
    run_here("train.py", tmp_path / "on", *paths, *QUICK[:1], "trainer.max_epochs=2", f"ckpt_path={old}", *NO_FIGURES)
    assert read_metrics(tmp_path / "on")["status"] == "finished"


def test_a_one_cycle_too_short_for_its_first_phase_is_one_line(paths: list[str], tmp_path: Path) -> None:
    # 800 images in batches of 200: 4 steps, and a first phase of 0.25 × 4 = 1 step, which torch divides by.
    with pytest.raises(SystemExit, match=r"cannot span this run's 4 steps: .* another scheduler\.pct_start"):
        run_here("train.py", tmp_path / "run", *paths, *QUICK, "scheduler=onecycle", "data.batch_size=200")


def test_a_fixed_schedule_length_that_is_not_the_runs_is_named(paths: list[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"scheduler\.total_steps=100, but this run takes 8 steps: leave it null"):
        run_here("train.py", tmp_path / "run", *paths, *QUICK, "scheduler=onecycle", "scheduler.total_steps=100")


@pytest.fixture(scope="module")
def one_cycle_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A run with a one-cycle schedule, Lookahead and batch norm's own learning rate (8 steps), and its step.ckpt
    of step 5: a run of the same length continues from it."""
    run_dir = tmp_path_factory.mktemp("one_cycle") / "run"
    paths = [f"paths.data_dir={data_dir}", f"paths.data_mirror={MIRROR}"]
    methods = ["scheduler=onecycle", "callbacks=[default,lookahead]", "model.batch_norm=true", "test=false"]
    every = "callbacks.step_checkpoint.every_n_train_steps=5"
    run_here("train.py", run_dir, *paths, *QUICK, *methods, "classifier.norm_lr_scale=4", every, *NO_FIGURES)
    assert checkpoints.load(run_dir / "checkpoints" / "step.ckpt")["global_step"] == 5
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize(
    ("craft", "error"),
    [
        (lambda c: [p.update(end_step=0.0) for p in c["lr_schedulers"][0]["_schedule_phases"]], "not make a schedule"),
        (lambda c: c["lr_schedulers"][0].update(last_epoch=10**6), "does not make a schedule"),
        (lambda c: c["optimizer_states"][0]["param_groups"][0].pop("max_lr"), "does not make a schedule"),
        (lambda c: c["callbacks"].update(Lookahead=[1, 2]), "Lookahead state is not a mapping"),
        (lambda c: c["hyper_parameters"].update(norm_lr_scale=2.0), "classifier.norm_lr_scale=2.0, not this run's 4"),
    ],
)
def test_a_crafted_schedule_or_lookahead_state_is_refused_in_one_line(
    one_cycle_run: Path, paths: list[str], tmp_path: Path, craft, error: str
) -> None:
    state = checkpoints.load(one_cycle_run / "checkpoints" / "step.ckpt")
    craft(state)
    crafted = tmp_path / "crafted.ckpt"
    torch.save(state, crafted)
    methods = ["scheduler=onecycle", "callbacks=[default,lookahead]", "model.batch_norm=true"]
    with pytest.raises(SystemExit) as refused:
        run_here(
            "train.py", tmp_path / "on", *paths, *QUICK, *methods, "classifier.norm_lr_scale=4", f"ckpt_path={crafted}",
            *NO_FIGURES,
        )  # fmt: skip
    assert str(refused.value).startswith("error:") and error in str(refused.value), refused.value


@pytest.mark.slow
def test_optimizers_that_refuse_a_second_group_or_name_no_lr(paths: list[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"optimizer .* is refused by torch: LBFGS doesn't support per-parameter"):
        run_here(
            "train.py", tmp_path / "lbfgs", *paths, *QUICK, "model.batch_norm=true", "classifier.norm_lr_scale=8",
            "optimizer._target_=torch.optim.LBFGS", "~optimizer.momentum", "~optimizer.weight_decay",
            "~optimizer.nesterov",
        )  # fmt: skip
    lbfgs = {"_target_": "torch.optim.LBFGS"}  # one group, as without norm_lr_scale the parameters are
    assert len(Classifier(net=NET, optimizer=lbfgs).configure_optimizers().param_groups) == 1
    settings = {"_target_": "torch.optim.Adadelta"}  # torch's lr for it is 1.0: the norm group's is 8 × that
    model = Classifier(net=NET, optimizer=settings, norm_lr_scale=8)
    assert [group["lr"] for group in model.configure_optimizers().param_groups] == [1.0, 8.0]


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_muon_steps_filters_as_torchs_muon_and_the_rest_as_torchs_sgd(channels_last: bool) -> None:
    """optimizer=muon: each conv layer's filters take torch.optim.Muon's step on their out × in·kh·kw matrix, in
    either memory layout; every other parameter takes torch.optim.SGD's."""
    torch.manual_seed(0)
    net = ConvNet(**{k: v for k, v in NET.items() if k != "_target_"}, channels_last=channels_last)
    optimizer = ConvMuon(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01, muon_lr=0.05, muon_momentum=0.95)
    filters = [p for p in net.parameters() if p.ndim == 4]
    others = [p for p in net.parameters() if p.ndim != 4]
    assert [g["muon"] for g in optimizer.param_groups] == [False, True]
    matrices = [p.detach().reshape(len(p), -1).clone().requires_grad_() for p in filters]
    copies = [p.detach().clone().requires_grad_() for p in others]
    muon = torch.optim.Muon(matrices, lr=0.05, momentum=0.95, weight_decay=0.01)
    sgd = torch.optim.SGD(copies, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    for _ in range(3):  # momentum carries over between steps
        optimizer.zero_grad()
        F.cross_entropy(net(torch.randn(8, 1, 28, 28)), torch.arange(8)).backward()
        for copy, p in [*zip(matrices, filters, strict=True), *zip(copies, others, strict=True)]:
            copy.grad = p.grad.reshape(copy.shape).clone()
        optimizer.step(), muon.step(), sgd.step()
    for p, matrix in zip(filters, matrices, strict=True):
        assert torch.allclose(p.detach().reshape(len(p), -1), matrix, atol=1e-6)
        assert p.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert all(torch.equal(p, copy) for p, copy in zip(others, copies, strict=True))


def test_conv_muon_continues_from_its_state_to_the_bit_and_refuses_another_split() -> None:
    def trained(steps: int, state: dict | None = None) -> tuple[ConvNet, ConvMuon]:
        torch.manual_seed(0)
        net = ConvNet(**{k: v for k, v in NET.items() if k != "_target_"})
        optimizer = ConvMuon(net.parameters())
        if state is not None:
            net.load_state_dict(state["net"]), optimizer.load_state_dict(state["optimizer"])
        for step in range(0 if state is None else 2, steps):
            optimizer.zero_grad()
            images = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(step))
            F.cross_entropy(net(images), torch.arange(8)).backward()
            optimizer.step()
        return net, optimizer

    whole, _ = trained(4)
    net, optimizer = trained(2)
    saved = {"net": net.state_dict(), "optimizer": optimizer.state_dict()}
    resumed, _ = trained(4, saved)
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters(), strict=True))
    # A crafted file must not choose the work each step does, nor a momentum that is not its parameter's.
    for value in (10**9, 5.0):
        saved["optimizer"]["param_groups"][1]["ns_steps"] = value
        with pytest.raises(UserError, match=rf"param_groups\[1\]\.ns_steps={value}, this run's ConvMuon 5"):
            trained(4, saved)
    saved["optimizer"]["param_groups"][1]["ns_steps"] = 5
    first_filters = len([p for p in net.parameters() if p.ndim != 4])
    saved["optimizer"]["state"][first_filters]["momentum_buffer"] = torch.tensor(1.0)
    with pytest.raises(ValueError, match=rf"momentum_buffer of parameter {first_filters} is \[\], the parameter"):
        trained(4, saved)
