"""What a run prints: one Rich console for the progress bar, tables and log lines, and what goes on it.

A single run prints a short header (what was chosen and overridden, where the run is written), the layer table,
its progress, and its result (how it went, its metrics, where they are). In a sweep each job prints one line when
it starts and one when it ends; the rest of a job's output goes to its own log file (train.log). The full resolved
config is in each run's config.yaml (`python train.py --cfg job` prints it).
"""

import io
import json
import logging
import re
from pathlib import Path
from typing import Any

import rich
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cnn_exp import sweep
from cnn_exp.errors import shown
from cnn_exp.record import TEST_ACC, TEST_LOSS, VAL_ACC, VAL_LOSS, key_settings


def get() -> Console:
    """The process's one console: Lightning's progress bar draws on it, so whatever else is printed on it (log
    lines, tables) appears above the live bar instead of breaking it.

    It is Rich's global console, which Lightning's RichProgressBar (re)configures from its `console_kwargs`.
    """
    return rich.get_console()


# Information no one can act on, kept off the console (the run's log file keeps it): (logger name prefix, pattern).
NOISE = [
    ("lightning", r"Seed set to "),  # the header shows the seed
    ("lightning", r"Trainer already configured with model summary"),  # LayerTable is our model summary
    ("lightning", r"(GPU|TPU|HPU) available: False"),  # nothing to choose from
    ("lightning", r"LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES: "),  # "GPU available: True (cuda), used: True" says it
    ("lightning", r"Initializing distributed: GLOBAL_RANK: "),  # one per process; the next line counts them
    ("lightning", r"💡 Tip: "),  # cloud services advertised at every start
    ("lightning", r"`Trainer\.fit` stopped: `max_epochs="),  # the bar's last line reads Epoch N/N
    # Which checkpoint was tested is in the result line and metrics.json.
    ("lightning", r"Restoring states from the checkpoint path at |Loaded model weights from the checkpoint at "),
    # Each job of a sweep prints its own line when it starts (JobLines); submitit's record of what it submitted stays.
    # Hydra's basic launcher logs under its private module's name: no setting of Hydra's turns these lines off.
    ("hydra._internal.core_plugins.basic_launcher", r""),
    ("hydra_plugins.hydra_joblib_launcher", r""),
    ("hydra_plugins.hydra_optuna_sweeper", r"(Study name|Storage|Sampler|Directions): "),
    ("alembic", r""),  # the database library under Optuna, setting itself up
]


class Quiet(logging.Filter):
    """Keeps the NOISE lines off the handler it is attached to; warnings and errors always pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        message = re.sub(r"^\[rank: \d+\] ", "", record.getMessage())  # Lightning's prefix on other ranks' lines
        return not any(record.name.startswith(name) and re.match(pattern, message) for name, pattern in NOISE)


# The logger that copies what `show` prints to the run's log file; the console handler skips it (already printed).
SHOWN = "cnn_exp.shown"


def show(*renderables: Any, style: str | None = None) -> None:
    """Print on the console (above the live bar) and keep the same text in the run's log file (train.log), so the log
    holds every line the console showed: the header, the layer table, the test tables, the result."""
    get().print(*renderables, sep="\n", style=style, markup=False, highlight=False, soft_wrap=True)
    plain = Console(file=io.StringIO(), width=max(get().width, 100), color_system=None, soft_wrap=True)
    plain.print(*renderables, sep="\n", markup=False, highlight=False)
    logging.getLogger(SHOWN).info("\n%s", plain.file.getvalue().rstrip())


def epoch_line(row: dict[str, Any], epochs: int | None) -> None:
    """One line per finished epoch that stays on screen above the live bar, as the notebook prints them (and kept in
    the log file). A sweep job, whose own output stays off the console, shows this line as its progress."""
    parts = [f"epoch {row['epoch']}" + (f"/{epochs}" if epochs and epochs > 0 else "")]
    for split in ("train", "val"):
        loss, acc = row.get(f"{split}/loss"), row.get(f"{split}/acc")
        if loss is not None and acc is not None:
            parts.append(f"{split} loss {loss:.4f} acc {100 * acc:.2f} %")
    parts.append(f"{row.get('seconds', 0):.1f} s")
    line = " · ".join(parts)
    if get().quiet and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        get().quiet = False
        try:
            _print(f"job {HydraConfig.get().job.num}: {line}", style="dim")
        finally:
            get().quiet = True
        logging.getLogger(SHOWN).info(line)
    else:
        show(Text(line))


class Handler(logging.Handler):
    """Log records printed on the console: the message alone, `warning: ...` or `error: ...` when they are one.

    Python warnings (Lightning's among them) are routed through logging too, so they neither break the live bar
    nor show a source path; the log file keeps them whole.
    """

    def __init__(self, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        logging.captureWarnings(True)

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == SHOWN:  # `show` printed it
            return
        try:
            message = self.format(record)
            if record.name == "py.warnings":
                message = _warning_text(record.getMessage())
            style = None
            if record.levelno >= logging.WARNING:
                message = f"{record.levelname.lower()}: {message}"
                style = "red" if record.levelno >= logging.ERROR else "yellow"
            get().print(message, style=style, markup=False, highlight=False, soft_wrap=True)
        except Exception:
            self.handleError(record)


def _warning_text(text: str) -> str:
    """A Python warning's text without the `path:line: Category: ` before it (Lightning's leave out the category)
    and the source line after it."""
    match = re.match(r".*?:\d+: (?:\w*Warning: )?(.*?)\n(?:  .*\n)?$", text, re.DOTALL)
    return match.group(1) if match else text.strip()


def print_run_header(cfg: DictConfig, output_dir: Path) -> None:
    """What this run is, in a few lines: the config groups chosen, the main settings, the overrides given, and
    where the run is written. The full resolved config is in its config.yaml."""
    # Imported here: Hydra loads this module to set up logging, also for --help, which needs no Lightning.
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    hydra = HydraConfig.get()
    choices = {group: choice for group, choice in _choices(cfg).items() if not group.startswith("hydra")}
    chosen = [f"{group}={choices.pop(group)}" for group in GROUPS if choices.get(group) is not None]
    chosen += [f"{group}={choice}" for group, choice in choices.items() if choice is not None and group != "paths"]
    values = key_settings(cfg)
    given = [_setting(label, values[name]) for name, label in SETTINGS.items() if values[name] is not None]
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    rows = {"chosen": " ".join(chosen), "settings": " · ".join(given), "overrides": " ".join(hydra.overrides.task)}
    if cfg.get("resume"):
        start = Path(cfg.ckpt_path).name if cfg.get("ckpt_path") else "the beginning (it had saved nothing)"
        rows["resumes"] = f"{cfg.resume}, from {start}"
    elif cfg.get("ckpt_path"):
        rows["continues"] = str(cfg.ckpt_path)
    for name, value in rows.items():
        table.add_row(name, Text(value or "none"))  # Text: an override such as callbacks=[a,b] is not markup
    table.add_row("run", Text.assemble(str(output_dir), ("\nconfig.yaml there holds the full config", "dim")))
    show(table)


def _choices(cfg: DictConfig) -> dict[str, Any]:
    """The config groups' choices of the run: a resumed run's own, from Hydra's record of its start (the resume
    command chooses none: it would show the defaults), else this command's."""
    if cfg.get("resume"):
        try:
            choices = OmegaConf.load(Path(cfg.resume) / ".hydra" / "hydra.yaml").hydra.runtime.choices
            return {shown(group): None if choice is None else shown(choice) for group, choice in choices.items()}
        except Exception:  # no record, or not Hydra's: this command's choices, as for a new run
            pass
    return dict(HydraConfig.get().runtime.choices)


# The order in which the header names the config groups chosen; any others follow.
GROUPS = ["experiment", "data", "model", "optimizer", "scheduler", "trainer", "logger", "callbacks", "hparams_search"]
# The key settings the header shows (record.KEY_SETTINGS's names), in this order and in these words.
SETTINGS = {
    "lr": "lr",
    "batch_size": "batch",
    "max_epochs": "epochs",
    "val_size": "validation images",
    "padding": "padding",
    "seed": "seed",
}


def _setting(name: str, value: Any) -> str:
    if name == "validation images" and isinstance(value, float) and 0 < value < 1:  # a share (data=folder)
        return f"{value:.0%} for validation"
    if name in ("epochs", "validation images"):
        return f"{value} {name.removesuffix('s') if value == 1 else name}"
    return f"{name} {value}"


class JobLines(Callback):
    """Hydra callback: a run's result at its end; in a sweep, a job's start line and result line only.

    A sweep job's own output (layer table, progress bar, tables, log lines) stays off the console: its log file
    and result files keep the details, and the console shows the sweep at a glance.
    """

    def __init__(self) -> None:
        self.varied: list[str] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Kept on this object, which Hydra hands to every job, also to jobs in other processes (joblib, submitit).
        self.varied = sweep.varied_keys(config)
        _print(f"sweep: {config.hydra.sweep.dir}")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        overrides = [o for o in config.hydra.overrides.task if not o.startswith(("paths.", "hydra."))]
        if self.varied:
            overrides = [o for o in overrides if sweep.split_override(o)[0] in self.varied]
        _print(f"job {config.hydra.job.num}: {' '.join(map(_short, overrides))}")
        get().quiet = True

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        from lightning.pytorch.utilities import rank_zero_only  # loaded by now: the job has run

        multirun = config.hydra.mode == RunMode.MULTIRUN
        get().quiet = False
        if rank_zero_only.rank != 0:  # under DDP every rank runs the job; one reports it
            return
        run_dir = Path(config.hydra.runtime.output_dir)
        try:
            record = json.loads((run_dir / "metrics.json").read_text())
        except (OSError, ValueError):
            record = {}
        if multirun:
            line = f"job {config.hydra.job.num}: {result_text(record, brief=True)}"
            if record.get("status") != "finished":
                line += f" (see {Path(config.hydra.sweep.subdir) / (config.task_name + '.log')})"
            _print(line)
        elif record.get("status") == "finished":
            show(Text(result_text(record), style="bold"), Text(f"results in {run_dir}"))


def _print(line: str, style: str | None = None) -> None:
    """One line as it is (an override such as callbacks=[a,b] is not markup), wrapped by the terminal."""
    get().print(line, style=style, markup=False, highlight=False, soft_wrap=True)


def result_text(record: dict[str, Any], brief: bool = False) -> str:
    """How a run ended, from its metrics.json: its final metrics, or what stopped it. One line when `brief` (a
    sweep job's), else a line of how it went and a line of metrics."""
    status = record.get("status", "failed before it started")
    if status != "finished":
        error = str(record.get("error", "")).strip().splitlines()
        return f"{shown(status)}: {shown(error[-1])}" if error else shown(status)
    how = [f"{record['epochs']} epoch{'s' if record['epochs'] != 1 else ''}"] if "epochs" in record else []
    if stopped := record.get("early_stopping"):
        how.append(f"stopped early ({stopped['monitor']}, patience {stopped['patience']})")
    if record.get("tested") and not brief:
        how.append(f"tested {shown(Path(record['tested']).name)}")
    metrics = record.get("metrics", {})
    names = [VAL_ACC, TEST_ACC] if brief else [VAL_ACC, VAL_LOSS, TEST_ACC, TEST_LOSS]
    values = " · ".join(f"{name} {metrics[name]:.4f}" for name in names if name in metrics)
    took = f" in {record['wall_time_s']:.0f} s" if "wall_time_s" in record else ""
    if brief:
        return f"finished{took}: {' · '.join([*how, values])}"
    return f"finished{took}" + (f": {', '.join(how)}" if how else "") + f"\n{values}"


def _short(override: str) -> str:
    """An override with a long float shortened (an Optuna sample: optimizer.lr=0.01037102396887841)."""
    value = sweep.split_override(override)[1]  # as given: the override ends in it
    if re.fullmatch(r"-?\d+\.\d{5,}(e-?\d+)?", value):
        return override.removesuffix(value) + f"{float(value):.4g}"
    return override


def choices(group: str, default: str | None = None) -> str:
    """`${choices:group,default}` in this project's --help (conf/hydra/help/cnn_exp.yaml): the group's options on
    the running app's config search path, the default first, so that an option added in conf/ or a config directory
    of one's own is listed."""
    from hydra.core.global_hydra import GlobalHydra  # imported here: Hydra loads this module to set up logging

    if not GlobalHydra.instance().is_initialized():
        return default or ""
    found = GlobalHydra.instance().config_loader().get_group_options(group)
    return "|".join(sorted(found, key=lambda option: option != default))


def register_help_resolver() -> None:
    """`${choices:...}`, registered by the entry points before Hydra renders --help (cnn_exp/run.setup)."""
    OmegaConf.register_new_resolver("choices", choices, replace=True)
