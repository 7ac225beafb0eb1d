"""Stands for code nobody chose to run: importing it leaves a file behind. No config names it."""

from pathlib import Path

Path(__file__).with_name("imported").touch()


class Payload:
    pass
