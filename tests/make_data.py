"""Write the small real subsets the tests train on: the first 1,000 training and 200 test images of each dataset.

    python -m tests.make_data --mirror ../shared/datasets

The files keep torchvision's layout and names (tests/data/<Dataset>/raw/*.gz), so the tests load them through
the project's own mirror path: `paths.data_mirror=tests/data`.
"""

import argparse
import gzip
import struct
import tempfile
from pathlib import Path

import torch

from cnn_exp.data import DATASETS, MNISTDataModule

# IDX magic numbers: unsigned bytes, then the number of dimensions.
IMAGES_MAGIC, LABELS_MAGIC = 0x0803, 0x0801


def write_idx(path: Path, magic: int, tensor: torch.Tensor) -> None:
    """An IDX file, gzip-compressed with a fixed timestamp so the same data gives the same bytes."""
    header = struct.pack(f">I{tensor.dim()}I", magic, *tensor.shape)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
        out.write(header + tensor.to(torch.uint8).numpy().tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mirror", required=True, help="folder with the full datasets in torchvision's layout")
    parser.add_argument("--out", default=Path(__file__).parent / "data", type=Path)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--test", type=int, default=200)
    args = parser.parse_args()
    for name, dataset in DATASETS.items():
        with tempfile.TemporaryDirectory() as tmp:
            MNISTDataModule(name, data_dir=tmp, mirror=args.mirror, download=False).prepare_data()
            raw = args.out / name / "raw"
            raw.mkdir(parents=True, exist_ok=True)
            for train, prefix, count in ((True, "train", args.train), (False, "t10k", args.test)):
                split = dataset(tmp, train=train)
                write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", IMAGES_MAGIC, split.data[:count])
                write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", LABELS_MAGIC, split.targets[:count])
        print(f"{name}: {args.train} training and {args.test} test images in {raw}")


if __name__ == "__main__":
    main()
