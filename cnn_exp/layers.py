"""The layer table: each layer of the network with its shapes for one image, weight and bias shapes and parameters,
printed and saved as architecture.md before training or testing; and, said plainly, what forward() does outside
its layers."""

import inspect
import json
import textwrap
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.model_summary import ModelSummary as Summary
from rich.table import Table
from rich.text import Text
from torch import nn

from cnn_exp import atomic, console, netdraw
from cnn_exp.plots import pixels, write_png


def _shape(size: list[int] | torch.Size) -> str:
    return "×".join(map(str, size))


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        return f"Conv2d {_shape(module.kernel_size)}, padding {module.padding[0]}"
    if isinstance(module, nn.MaxPool2d):
        return f"MaxPool2d {module.kernel_size}×{module.kernel_size}"
    return type(module).__name__


def layer_rows(model: L.LightningModule) -> list[dict[str, str | int]]:
    """One row per layer of `model.net`, with shapes for one image recorded during a real forward pass.

    Lightning's ModelSummary runs `example_input_array` through the model with hooks on every module, so the
    shapes are those the code produces, for any padding, kernel or width.
    """
    summary = Summary(model, max_depth=-1)
    modules = dict(model.named_modules())
    rows = []
    for name, inputs, outputs, params in zip(
        summary.layer_names, summary.in_sizes, summary.out_sizes, summary.param_nums, strict=True
    ):
        module = modules[name]
        if not name.startswith("net.") or next(module.children(), None) is not None:
            continue
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        rows.append(
            {
                "layer": name.removeprefix("net."),
                "type": _kind(module),
                "input": _shape(inputs[1:]),  # without the batch dimension
                "output": _shape(outputs[1:]),
                "weight": _shape(weight.shape) if weight is not None else "",
                "bias": _shape(bias.shape) if bias is not None else "",
                "parameters": params,
            }
        )
    return rows


def unlisted_operations(net: nn.Module) -> str | None:
    """What the layer table cannot show, said plainly: the operations forward() does without a layer of its own (a
    functional ReLU, a residual addition, a pooling call), found by tracing it with torch.fx. None when every
    operation is a layer (ConvNet)."""
    try:
        graph = torch.fx.symbolic_trace(net).graph
    except Exception:  # control flow on values, say: fx cannot follow it
        return "Its forward() could not be traced: operations it does outside its layers are not listed."
    done = [node.target for node in graph.nodes if node.op in ("call_function", "call_method")]
    names = sorted({getattr(target, "__name__", str(target)) for target in done})
    if not names:
        return None
    return f"Its forward() also does, outside these layers (not listed): {', '.join(names)}."


class LayerTable(ModelSummary):
    """Prints the network layer by layer (shapes for one image, weight and bias shapes, parameters) and saves it
    as `architecture.md`, before training or testing. It is a ModelSummary, so the Trainer adds no other summary.
    """

    def __init__(self, dirpath: str, draw: bool = True) -> None:
        super().__init__()
        self.dirpath = Path(dirpath)
        self.draw = draw  # network.png and TensorBoard's picture of the network
        self._shown = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._show(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._show(trainer, pl_module)

    def _show(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._shown or not trainer.is_global_zero:
            return
        self._shown = True
        rows = layer_rows(pl_module)
        total = sum(int(row["parameters"]) for row in rows)
        title = f"{type(pl_module.net).__name__}, one {_shape(pl_module.example_input_array.shape[1:])} image"
        table = Table(*rows[0], title=title)
        for row in rows:
            table.add_row(*map(str, row.values()))
        table.add_row("total", *[""] * 5, f"{total:,}", style="bold")
        unseen = unlisted_operations(pl_module.net)
        console.show(table, *([Text(unseen)] if unseen else []))
        lines = [f"# {title}", "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(map(str, row.values())) + " |" for row in rows]
        lines.append("| total |" + " |" * 5 + f" {total:,} |")
        lines += ["", unseen] if unseen else []
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / "architecture.md").write_text("\n".join(lines) + "\n")
        # For the report: the same table, each layer's size arithmetic, the network's forward() as the code says it,
        # and the network drawn (also in TensorBoard's Images tab).
        network = {"title": title, "rows": rows, "total": total, "unseen": unseen}
        network |= {"arithmetic": netdraw.size_arithmetic(pl_module.net), "forward": forward_source(pl_module.net)}
        atomic.write_text(self.dirpath / "network.json", json.dumps(network, indent=1) + "\n")
        if not self.draw:
            return
        drawn = pixels(netdraw.network_figure(pl_module.net, title))
        write_png(drawn, self.dirpath / "network.png")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("network", drawn, global_step=trainer.global_step, dataformats="HWC")


def forward_source(net: nn.Module) -> str | None:
    """The source of the network's forward(), as written; None where Python cannot find it."""
    try:
        return textwrap.dedent(inspect.getsource(type(net).forward))
    except (OSError, TypeError):
        return None
