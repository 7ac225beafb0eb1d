"""Muon for the conv filters, SGD for the rest, as one optimizer: airbench's Muon variant (optimizer=muon)."""

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, muon
from torch.optim.sgd import sgd

from cnn_exp.errors import UserError, is_number, is_whole

# torch's Newton–Schulz iteration refuses this many steps or more.
MAX_NS_STEPS = 100


class ConvMuon(torch.optim.Optimizer):
    """Muon (torch.optim.Muon's update: momentum, then orthogonalized by Newton–Schulz iterations) for every conv
    layer's filters, each bank of them as a matrix of out channels × (in channels · kernel height · kernel width);
    SGD with momentum (torch.optim.SGD's update) for every other parameter: biases, batch norm, the FC layers.

    torch.optim.Muon takes 2-D parameters only, and Lightning trains with one optimizer: this splits each parameter
    group it is given into its conv filters (`muon_lr`, `muon_momentum`) and the rest (`lr`, `momentum`), and steps
    each part with torch's own functional update, weight decay included (decoupled for Muon, added to the gradient
    for SGD). The groups are ordinary ones, so a schedule over each group's own learning rate scales both parts, and
    the state (momentum buffers shaped as their parameters) saves and resumes as any optimizer's.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        muon_lr: float = 0.02,
        muon_momentum: float = 0.95,
        ns_steps: int = 5,
    ) -> None:
        for name, value in (("lr", lr), ("muon_lr", muon_lr), ("weight_decay", weight_decay)):
            if not is_number(value) or not math.isfinite(value) or value < 0:
                raise UserError(f"optimizer.{name}={value} must be a finite number, 0 or more")
        for name, value in (("momentum", momentum), ("muon_momentum", muon_momentum)):
            if not is_number(value) or not 0 <= value < 1:
                raise UserError(f"optimizer.{name}={value} must be at least 0 and below 1")
        if not is_whole(ns_steps) or not 1 <= ns_steps < MAX_NS_STEPS:  # torch's Newton–Schulz refuses 100 or more
            raise UserError(
                f"optimizer.ns_steps={ns_steps} must be a whole number of iterations, 1 to {MAX_NS_STEPS - 1}"
            )
        if not isinstance(nesterov, bool):
            raise UserError(f"optimizer.nesterov={nesterov} must be true or false")
        if nesterov and not momentum:  # as torch.optim.SGD refuses it
            raise UserError("optimizer.nesterov=true needs optimizer.momentum above 0: set one, or nesterov=false")
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay,
                    "ns_steps": ns_steps}  # fmt: skip
        super().__init__(_split(params, muon_lr, muon_momentum), defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            buffers = [self.state[p].get("momentum_buffer") for p in params]
            settings = {"lr": group["lr"], "weight_decay": group["weight_decay"], "momentum": group["momentum"]}
            if not group["muon"]:
                sgd(params, [p.grad for p in params], buffers, dampening=0.0, nesterov=group["nesterov"],
                    maximize=False, **settings)  # fmt: skip
                if group["momentum"]:  # sgd made the first ones, as torch.optim.SGD keeps them
                    for p, buffer in zip(params, buffers, strict=True):
                        self.state[p]["momentum_buffer"] = buffer
                continue
            for p, buffer in zip(params, buffers, strict=True):
                # Shaped as its filters, so that a checkpoint's is checked like any optimizer's, and laid out as they
                # are, so that its matrix is a view that the update changes in place.
                if buffer is None:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                elif buffer.stride() != p.stride():
                    self.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(buffer)
            muon([_matrix(p, p) for p in params], [_matrix(p.grad, p) for p in params],
                 [_matrix(self.state[p]["momentum_buffer"], p) for p in params], nesterov=group["nesterov"],
                 ns_coefficients=(DEFAULT_A, DEFAULT_B, DEFAULT_C), ns_steps=group["ns_steps"], eps=EPS,
                 adjust_lr_fn=None, has_complex=False, **settings)  # fmt: skip
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A saved state continues only this optimizer's split and iterations: which groups are filters, and how many
        Newton–Schulz iterations each step runs, are the config's, not a checkpoint's to change; and each momentum
        buffer must be shaped as its parameter (torch would broadcast a single number into one)."""
        for index, (group, saved) in enumerate(zip(self.param_groups, state_dict["param_groups"], strict=False)):
            missing = sorted(set(group) - set(saved) - {"params"})
            if missing:
                raise ValueError(f"param_groups[{index}] lacks {', '.join(missing)}")
            for key in ("muon", "ns_steps"):
                if type(saved[key]) is not type(group[key]) or saved[key] != group[key]:
                    raise UserError(
                        f"the checkpoint's optimizer state has param_groups[{index}].{key}={saved[key]!r}, this run's "
                        f"ConvMuon {group[key]!r} (optimizer.ns_steps and which parameters are conv filters): it "
                        "continues only its own"
                    )
        super().load_state_dict(state_dict)
        for number, p in enumerate(p for group in self.param_groups for p in group["params"]):
            buffer = self.state.get(p, {}).get("momentum_buffer")
            if buffer is not None and (not isinstance(buffer, torch.Tensor) or buffer.shape != p.shape):
                shape = list(buffer.shape) if isinstance(buffer, torch.Tensor) else type(buffer).__name__
                raise ValueError(f"momentum_buffer of parameter {number} is {shape}, the parameter {list(p.shape)}")


def _split(params: Iterable[Any], muon_lr: float, muon_momentum: float) -> list[dict[str, Any]]:
    """Each given group (or the one a list of parameters makes) as two: all but its conv filters, then the filters."""
    given = list(params)
    groups = given if given and isinstance(given[0], dict) else [{"params": given}]
    split = []
    for group in groups:
        filters = [p for p in group["params"] if p.ndim == 4]
        others = [p for p in group["params"] if p.ndim != 4]
        # A group's own lr (batch norm's, classifier.norm_lr_scale) applies to its SGD part.
        # The rest first: the first group's lr is the optimizer's lr, as the epoch table and LR monitor show it.
        if others:
            split.append({**group, "params": others, "muon": False})
        if filters:
            split.append({**group, "params": filters, "muon": True, "lr": muon_lr, "momentum": muon_momentum})
    return split


def _matrix(tensor: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """A filter bank's tensor (out × in × kh × kw: the filters, their gradient, their momentum) as an out × (in·kh·kw)
    matrix with its columns in the order the filters' memory holds them, a view wherever the tensor is laid out as
    the filters are, so an update of the matrix is an update of the tensor. Channels-last filters order their columns
    otherwise: the orthogonalized update of a matrix with its columns reordered is the update with its columns
    reordered, so either order will do, as long as filters, gradient and momentum share it."""
    if filters.is_contiguous():
        return tensor.contiguous().view(len(tensor), -1)
    if filters.is_contiguous(memory_format=torch.channels_last):
        return tensor.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).view(len(tensor), -1)
    raise ValueError(f"ConvMuon: filters of shape {tuple(filters.shape)} laid out in neither NCHW nor NHWC order")
