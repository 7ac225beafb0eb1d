#!/usr/bin/env bash
# The GPU numbers of benchmarks/README.md, in one go on a CUDA machine holding this checkout:
#   bash benchmarks/gpu.sh MIRROR        # MIRROR: the datasets' files in torchvision's layout (.gz is fine)
set -euo pipefail
cd "$(dirname "$0")/.."
mirror=${1:?usage: bash benchmarks/gpu.sh MIRROR}
data=${CNN_EXP_BENCH_DATA:-/tmp/cnn-exp-data}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, lightning; print('torch', torch.__version__, '| lightning', lightning.__version__)"
# The notebook's loop, a bare loop and our path, side by side; then bf16, torch.compile and the memory format.
python3 -m benchmarks.compare --mirror "$mirror" --data-dir "$data" --device cuda --override trainer=gpu --rounds 2 --epochs 3
python3 -m benchmarks.compare --data-dir "$data" --device cuda --override trainer=gpu --table options --epochs 3
