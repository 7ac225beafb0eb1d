"""`${auto_precision:<accelerator>}`: bf16 mixed precision where it is measured faster, else fp32; the recipes chosen
in bf16 set trainer.precision to it (conf/experiment/fashion_*.yaml).

Faster means a CPU with bf16 arithmetic (AVX512-BF16 or AMX-BF16): there bf16 autocast trains the wider networks 1.3-1.5
times as fast as fp32. A CPU without it emulates bf16, 1.1-9 times slower than fp32. On a GPU these small networks
are bound by kernel launches, and autocast's casts made Network2 slower on an H100 (benchmarks/README.md): fp32 there.
The choice is made on the machine a run starts on and kept in its metrics.json; a resumed run keeps it (resume.py).
"""

import torch
from omegaconf import OmegaConf

BF16 = "bf16-mixed"
FP32 = "32-true"


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
