"""Train a CNN on MNIST or Fashion-MNIST: python train.py model=net3 data=fashion (see README.md)."""

import gc

gc.disable()  # while importing: setup() turns the collector on again, with what the imports made frozen

import hydra
from omegaconf import DictConfig

from cnn_exp.run import setup, train

setup()  # resolvers and config schemas, before Hydra composes the config


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":
    main()
