"""Test a trained checkpoint on the official test split: python test.py ckpt_path=PATH (see README.md)."""

import gc

gc.disable()  # while importing: setup() turns the collector on again, with what the imports made frozen

import hydra
from omegaconf import DictConfig

from cnn_exp.run import setup, test

setup()  # resolvers and config schemas, before Hydra composes the config


@hydra.main(version_base="1.3", config_path="conf", config_name="test")
def main(cfg: DictConfig) -> float:
    return test(cfg)


if __name__ == "__main__":
    main()
