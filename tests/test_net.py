"""The networks: the notebook's exact layers at the default configs, and any padding/kernel/width override."""

import copy
import inspect

import pytest
import torch
from hydra.utils import instantiate

from cnn_exp.errors import UserError
from cnn_exp.net import ConvNet
from tests.conftest import composed

# Parameter names and shapes as the notebook prints them (network.named_parameters()).
NETWORK2 = {
    "conv1.weight": (6, 1, 5, 5),
    "conv1.bias": (6,),
    "conv2.weight": (12, 6, 5, 5),
    "conv2.bias": (12,),
    "fc1.weight": (120, 192),
    "fc1.bias": (120,),
    "fc2.weight": (60, 120),
    "fc2.bias": (60,),
    "out.weight": (10, 60),
    "out.bias": (10,),
}
NETWORK3 = {
    **NETWORK2,
    "conv3.weight": (24, 12, 2, 2),
    "conv3.bias": (24,),
    "fc1.weight": (120, 96),
}


def config(name: str, **overrides: object) -> dict:
    return composed("model", name, **overrides)


def build(name: str, **overrides: object) -> ConvNet:
    cfg = config(name, **overrides)
    assert cfg.pop("_target_") == "cnn_exp.net.ConvNet"
    return ConvNet(**cfg)


@pytest.mark.parametrize(("name", "expected"), [("net2", NETWORK2), ("net3", NETWORK3)])
def test_default_configs_are_the_notebooks_networks(name: str, expected: dict) -> None:
    net = instantiate(config(name))
    assert {key: tuple(p.shape) for key, p in net.named_parameters()} == expected
    assert [key for key, _ in net.named_parameters()] == [key for key in net.state_dict()]
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def _side(size: int, kernel: int, padding: int) -> int:
    """Side of the feature map after a conv (stride 1) and a 2x2 max-pool."""
    return (size + 2 * padding - kernel + 1) // 2


@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("name", ["net2", "net3"])
def test_fc1_follows_any_padding(name: str, padding: int) -> None:
    net = build(name, padding=padding)
    cfg = config(name)
    kernels = cfg["kernel_size"] if isinstance(cfg["kernel_size"], list) else [cfg["kernel_size"]] * 3
    side = 28
    for kernel in kernels[: len(cfg["channels"])]:
        side = _side(side, kernel, padding)
    assert net.fc1.in_features == cfg["channels"][-1] * side * side
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_per_layer_lists_and_widths() -> None:
    net = build("net3", padding=[2, 2, 1], channels=[8, 16, 32], kernel_size=[3, 3, 3], hidden=[64])
    assert net.conv1.padding == (2, 2) and net.conv3.padding == (1, 1)
    assert [net.conv1.out_channels, net.conv2.out_channels, net.conv3.out_channels] == [8, 16, 32]
    assert not hasattr(net, "fc2") and net.out.in_features == 64
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_a_block_without_its_pool_hands_fc1_the_whole_map() -> None:
    net = build("net3", channels=[8, 16, 32], kernel_size=3, padding=1, pool=[True, True, False])
    names = [name for name, _ in net.named_children()]
    assert "conv2_pool" in names and "conv3_pool" not in names
    assert net.fc1.in_features == 32 * 7 * 7  # 28 -> 14 -> 7, and conv3 keeps 7x7
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    # One bool stands for every layer, as one int does for kernel_size and padding.
    assert build("net3", pool=True).fc1.in_features == build("net3", pool=[True, True, True]).fc1.in_features


@pytest.mark.parametrize("pool", ["yes", [True, 1, True], [True, False]])
def test_a_pool_that_is_not_true_or_false_per_layer_is_refused(pool: object) -> None:
    with pytest.raises(UserError, match=r"model.pool="):
        build("net3", pool=pool)


def test_pool_first_pools_before_batch_norm_and_relu_and_keeps_the_parameters() -> None:
    settings = {"channels": [8, 16, 32], "kernel_size": 3, "padding": 1, "pool": [True, True, False]}
    net = build("net3", batch_norm=True, pool_first=True, **settings)
    names = [name for name, _ in net.named_children()]
    assert names[:4] == ["conv1", "conv1_pool", "conv1_bn", "conv1_relu"]
    assert names[4:8] == ["conv2", "conv2_pool", "conv2_bn", "conv2_relu"]
    assert names[8:11] == ["conv3", "conv3_bn", "conv3_relu"]  # a block without its pool is unchanged
    plain = build("net3", batch_norm=True, **settings)
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    # Batch norm now sees the pooled map: its statistics, and so the network's output, differ.
    plain.load_state_dict(net.state_dict())
    images = torch.randn(4, 1, 28, 28)
    assert not torch.allclose(net(images), plain(images))
    assert not torch.allclose(net.conv1_bn.running_mean, plain.conv1_bn.running_mean)


def test_without_batch_norm_pool_first_is_the_same_network() -> None:
    # ReLU and max-pool commute, so only the order of the work changes.
    net, plain = build("net3", pool_first=True), build("net3")
    assert [name for name, _ in net.named_children()][:3] == ["conv1", "conv1_pool", "conv1_relu"]
    plain.load_state_dict(net.state_dict())
    images = torch.randn(4, 1, 28, 28)
    assert torch.equal(net(images), plain(images))


@pytest.mark.parametrize("value", ["yes", 1, [True]])
def test_a_pool_first_that_is_not_true_or_false_is_refused(value: object) -> None:
    with pytest.raises(UserError, match=r"model.pool_first=.* must be true or false"):
        build("net3", pool_first=value)


def test_a_vanishing_feature_map_names_the_layer() -> None:
    # 28 -> 24 -> 12 -> 8 -> 4: a 5x5 kernel on conv3's 4x4 input leaves nothing.
    with pytest.raises(UserError, match=r"conv3 .*12x4x4"):
        build("net3", kernel_size=5, padding=0)


def test_a_per_layer_list_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(UserError, match=r"model.padding=\[1, 1\] has 2 values but the network has 3 conv layers"):
        build("net3", padding=[1, 1])


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"padding": -1}, r"model.padding=\[-1, -1\]: every value must be a whole number of at least 0"),
        ({"channels": [0, 12]}, r"model.channels=\[0, 12\]: every value must be a whole number of at least 1"),
        ({"kernel_size": 0}, r"model.kernel_size=\[0, 0\]: every value must be a whole number of at least 1"),
        ({"hidden": [120, 0]}, r"model.hidden=\[120, 0\]: every value must be a whole number of at least 1"),
    ],
)
def test_sizes_that_cannot_make_a_layer_are_named(setting: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build("net2", **setting)


def test_batch_norm_and_dropout_are_optional_layers_that_train() -> None:
    net = build("net3", batch_norm=True, dropout=0.3)
    names = [name for name, _ in net.named_children()]
    assert names[:4] == ["conv1", "conv1_bn", "conv1_relu", "conv1_pool"] and "fc2_dropout" in names
    assert net.conv1.bias is None  # batch norm's shift takes the bias's place
    # The blank image that measured fc1 did not teach batch norm anything.
    assert torch.equal(net.conv1_bn.running_mean, torch.zeros(6)) and int(net.conv1_bn.num_batches_tracked) == 0
    expected = sum(p.numel() for p in build("net3").parameters()) - (6 + 12 + 24) + 2 * (6 + 12 + 24)
    assert sum(p.numel() for p in net.parameters()) == expected

    images, labels = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(net(images), labels).backward()
    optimizer.step()
    assert int(net.conv1_bn.num_batches_tracked) == 1
    net.eval()  # dropout off, batch norm on its running statistics: evaluation is deterministic
    assert torch.equal(net(images), net(images))


def test_dropout_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(UserError, match=r"model\.dropout=1\.0 must be at least 0 and below 1"):
        build("net2", dropout=1.0)


@pytest.mark.parametrize(
    "settings",
    [
        {"name": "net2"},
        {"name": "net3"},
        {"name": "net3", "channels_last": False},
        {"name": "net3", "batch_norm": True, "dropout": 0.3},
        {"name": "net3", "batch_norm": True, "pool_first": True, "pool": [True, True, False]},
        {"name": "net3", "channels": [8, 16, 32], "kernel_size": 3, "padding": 1, "pool": [True, True, False]},
    ],
    ids=["net2", "net3", "nchw", "batch_norm+dropout", "pool_first", "pool=[t,t,f]"],
)
def test_forward_calls_every_named_layer_once_in_their_order(settings: dict) -> None:
    # forward() is written out for the lab; the layers' order (named_children) is what the layer table, the
    # TensorBoard graph and the fc1 size measurement follow. Both must agree, exactly, in training and evaluation.
    settings = dict(settings)
    net = build(settings.pop("name"), **settings)
    images, called = torch.randn(4, 1, 28, 28), []
    for training in (True, False):
        net.train(training)
        in_order = copy.deepcopy(net)  # its own batch norm statistics, to be updated by the same batch
        called.clear()
        hooks = [
            layer.register_forward_hook(lambda *_, name=name: called.append(name))
            for name, layer in net.named_children()
        ]
        torch.manual_seed(0)  # the same dropout masks
        logits = net(images)
        for hook in hooks:
            hook.remove()
        assert called == [name for name, _ in net.named_children()]
        torch.manual_seed(0)
        x = images
        for layer in in_order.children():
            x = layer(x)
        assert torch.equal(logits, x)
        assert all(torch.equal(a, b) for a, b in zip(net.buffers(), in_order.buffers(), strict=True))


def test_forward_reads_as_the_labs() -> None:
    # The lab asks the student to complete and explain forward(): conv → ReLU → 2×2 max-pool per block, flatten,
    # fc → ReLU per hidden layer, out. Its source should keep saying so, not hand the work to a loop over layers.
    source = inspect.getsource(ConvNet.forward)
    steps = [
        "x = conv(x)",
        "x = relu(x)",
        "x = pool(x)",
        "x = self.flatten(x)",
        "x = relu(fc(x))",
        "return self.out(x)",
    ]
    where = [source.rfind(step) for step in steps]  # rfind: pool_first's pool comes earlier, before batch norm
    assert all(i >= 0 for i in where) and where == sorted(where), dict(zip(steps, where, strict=True))


def test_a_layer_replaced_after_construction_is_the_one_called() -> None:
    # forward() looks its layers up by name on each call, as nn.Sequential did, so conversions such as
    # SyncBatchNorm's (Lightning's sync_batchnorm) take effect.
    net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(build("net3", batch_norm=True))
    assert isinstance(net.conv1_bn, torch.nn.SyncBatchNorm)
    called: list[str] = []
    net.conv1_bn.register_forward_hook(lambda *_: called.append("conv1_bn"))
    net.eval()(torch.randn(2, 1, 28, 28))
    assert called == ["conv1_bn"]
