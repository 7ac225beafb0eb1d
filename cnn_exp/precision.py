"""`${auto_precision:<accelerator>}`: bf16 mixed precision where it is measured faster, else fp32; the recipes chosen
in bf16 set trainer.precision to it (conf/experiment/fashion_*.yaml).

Faster means a CPU with bf16 arithmetic (AVX512-BF16 or AMX-BF16): there bf16 autocast trains the wider networks 1.3-1.5
times as fast as fp32. A CPU without it emulates bf16, 1.1-9 times slower than fp32. On a GPU these small networks
are bound by kernel launches, and autocast's casts made Network2 slower on an H100 (benchmarks/README.md): fp32 there.
The choice is made on the machine a run starts on and kept in its metrics.json; a resumed run keeps it (resume.py).
Checkpoints say which precision trained them (CHECKPOINT_KEY), so that test.py tests in it by default and gives the
run's own test metrics.
"""

from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import OmegaConf

from cnn_exp.errors import UserError, shown

BF16 = "bf16-mixed"
FP32 = "32-true"
# The checkpoint key that holds the precision the run trained in (Lightning keeps none), and the values it may hold:
# Lightning's own names of its precisions.
CHECKPOINT_KEY = "trained_precision"
KNOWN = ("64-true", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "transformer-engine",
         "transformer-engine-float16")  # fmt: skip


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 in hardware."""
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()  # torch >= 2.8; older ones: treated as without
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def auto_precision(accelerator: str) -> str:
    """trainer.precision for `accelerator` ("auto", "cpu", "gpu", ...): bf16-mixed on a CPU with bf16, else 32-true."""
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    return BF16 if on_cpu and native_bf16_cpu() else FP32


def register_resolver() -> None:
    """`${auto_precision:...}`, registered by the entry points before Hydra resolves the config (cnn_exp/run.setup)."""
    OmegaConf.register_new_resolver("auto_precision", auto_precision, replace=True)


def trained_in(checkpoint: Mapping[str, Any]) -> str | None:
    """The precision a checkpoint says it trained in; None for one that does not say (written before it did). A value
    that is not one of Lightning's precisions is refused: the file is input."""
    value = checkpoint.get(CHECKPOINT_KEY)
    if value is not None and value not in KNOWN:
        raise UserError(f"{CHECKPOINT_KEY}={shown(value)}: not a precision train.py writes ({', '.join(KNOWN)})")
    return value
