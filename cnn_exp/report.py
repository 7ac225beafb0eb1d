"""The lab report of a run: report.html (one self-contained file, pictures embedded, prints to A4 or Letter) and
report.md (the same, pictures as the files beside it), rendered with Jinja2 from the run's own files.

Every number in it is read from what the run wrote (metrics.json, epochs.csv, per_class.csv, confusion.csv,
network.json, untrained.json) and every picture is one of its PNGs: the report computes nothing a second way, so it
says what the run recorded. It is written when a run starts, after every epoch, after its test and however it ends
(failed and interrupted runs too: what exists so far, status first); `report.enabled=false` turns it off.
"""

import base64
import csv
import functools
import json
import logging
import math
import re
import statistics
from pathlib import Path
from typing import Any

import jinja2
import markupsafe

from cnn_exp import atomic, record
from cnn_exp.errors import LINES_ESCAPES, shown
from cnn_exp.words import SENTENCES, SWEEP_WORDS, WORDS

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).with_name("templates")
# The pictures a report shows, by file name, in the order of its sections; a run has those it got to.
PICTURES = ("network.png", "curves.png", "confusion_matrix.png", "misclassified.png", "filters.png",
            "feature_maps.png", "saliency.png")  # fmt: skip
# What the report shows of metrics.json: absent keys read as None (a run that failed has no metrics, say).
RECORDED = (
    "status",
    "error",
    "signal",
    "resume",
    "what_ran",
    "provenance",
    "resumes",
    "epochs",
    "steps",
    "wall_time_s",
)
Z95 = 1.959964  # the normal quantile of a two-sided 95 % interval


def write(run_dir: str | Path) -> None:
    """Write report.html and report.md in `run_dir` from its files, unless its record turns reports off. A report
    that cannot be written (a file of the run damaged, a disk full) is one warning line, never the end of a run."""
    run_dir = Path(run_dir)
    saved = record.read(run_dir)
    if saved is None:
        if record.path(run_dir).exists():
            log.warning("no report in %s: its metrics.json cannot be read", run_dir)
        return
    settings = saved.get("report")
    if isinstance(settings, dict) and settings.get("enabled") is False:
        return
    try:
        context = gather(run_dir, saved)
        environment = _environment()
        for name in ("report.html", "report.md"):
            text = environment.get_template(f"{name}.j2").render(context, embed=name.endswith(".html"))
            atomic.write_text(run_dir / name, text)
    except Exception as err:  # the run's own files are input: whatever they hold, the run goes on
        log.warning("the report in %s could not be written: %s", run_dir, shown(err))


def write_sweep(
    sweep_dir: Path, rows: list[dict[str, Any]], metric: str, keys: list[str], seeds: list[dict[str, Any]],
    fixed: list[str],
) -> None:  # fmt: skip
    """Write report.html and report.md in a sweep's directory: its jobs best first (cnn_exp/sweep.py's rows), the
    picture, each swept key's effect, what a swept model setting changed layer by layer, the failed jobs' errors, and
    a link to each job's own report. Its language is its jobs' (report.lang); none when they turn reports off."""
    try:
        _write_sweep(sweep_dir, rows, metric, keys, seeds, fixed)
    except Exception as err:  # the jobs' files are input: whatever they hold, the sweep goes on
        log.warning("the sweep's report in %s could not be written: %s", sweep_dir, shown(err))


def _write_sweep(
    sweep_dir: Path, rows: list[dict[str, Any]], metric: str, keys: list[str], seeds: list[dict[str, Any]],
    fixed: list[str],
) -> None:  # fmt: skip
    records = {row["job"]: record.read(row["run_dir"]) or {} for row in rows if row.get("run_dir")}
    settings = next((r.get("report") for r in records.values() if r.get("report")), {}) or {}
    if not settings.get("enabled", True):
        return
    lang = settings.get("lang", "en") if settings.get("lang") in WORDS else "en"
    context = {
        "t": WORDS[lang] | SWEEP_WORDS[lang],
        "lang": lang,
        "title": sweep_dir.name,
        "metric": metric,
        "keys": keys,
        "fixed": fixed,
        "rows": rows,
        "seeds": seeds,
        "effects": _effects(rows, keys, metric),
        "layers": _layers_by_value(rows, keys),
        "failed": [
            (row["job"], (records.get(row["job"]) or {}).get("error") or row["status"])
            for row in rows
            if row["status"] != "ok"
        ],
        "reports": {
            row["job"]: f"{row['job']}/report.html"
            for row in rows
            if (Path(row["run_dir"] or "-") / "report.html").is_file()
        },
        "pictures": {"summary.png": _picture(sweep_dir / "summary.png")}
        if (sweep_dir / "summary.png").is_file()
        else {},
        "metrics": [name for name in ("val/acc", "test/acc") if any(row.get(name) is not None for row in rows)],
        # Before training, per seed (why the untrained scores change from run to run), from each job's untrained.json.
        "untrained": [
            {"job": row["job"], "seed": row["seed"], **scores}
            for row in rows
            if "seed" in keys and (scores := _untrained(_json(Path(row.get("run_dir") or "-") / "untrained.json")))
        ],
    }
    environment = _environment()
    for name in ("report.html", "report.md"):
        template = environment.get_template(f"sweep.{name.split('.')[1]}.j2")
        atomic.write_text(sweep_dir / name, template.render(context, embed=name.endswith(".html")))


def _effects(rows: list[dict[str, Any]], keys: list[str], metric: str) -> dict[str, list[dict[str, Any]]]:
    """Per swept key, per value: the finished jobs with it, and the mean and sample std of `metric` over them."""
    effects = {}
    for key in keys:
        values: dict[str, list[float]] = {}
        for row in rows:
            if row["status"] == "ok" and row.get(metric) is not None:
                values.setdefault(str(row.get(key, "")), []).append(row[metric])
        effects[key] = [
            {"value": value or "(default)", "jobs": len(scores), "mean": statistics.fmean(scores),
             "std": statistics.stdev(scores) if len(scores) > 1 else None}
            for value, scores in values.items()
        ]  # fmt: skip
    return effects


def _layers_by_value(rows: list[dict[str, Any]], keys: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Per swept model setting, per value: the layers that differ between its values (their type, e.g. "Conv2d 2×2,
    padding 1", and output shape), from one job's network.json each: model.padding=0 sets every conv layer."""
    changed = {}
    for key in (k for k in keys if k.startswith("model.")):
        tables: dict[str, dict[str, str]] = {}
        for row in rows:
            network = _json(Path(row.get("run_dir") or "-") / "network.json")
            value = str(row.get(key, "")) or "(default)"
            if network and value not in tables:
                # The layers with weights and the flatten (fc1's input): a ReLU or pool only follows its conv.
                tables[value] = {
                    r["layer"]: f"{r['type']} → {r['output']}"
                    for r in network.get("rows", [])
                    if r.get("weight") or str(r.get("type", "")).startswith("Flatten")
                }
        layers = list(dict.fromkeys(name for table in tables.values() for name in table))
        differing = [name for name in layers if len({table.get(name) for table in tables.values()}) > 1]
        if differing:
            changed[key] = [{"value": value, "layers": {name: table.get(name, "—") for name in differing}}
                            for value, table in tables.items()]  # fmt: skip
    return changed


@functools.cache  # compiling the templates takes 0.1 s: once per process, not at every epoch's report
def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        # The templates are named *.html.j2: escaping is chosen by that whole ending (a bare "html" never matches).
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=jinja2.select_autoescape(["html.j2"], default=False),
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, finalize=_without_controls,
    )  # fmt: skip
    environment.filters["cell"] = markdown_cell
    environment.filters["code"] = markdown_code
    environment.filters["log"] = math.log
    return environment


def _without_controls(value: Any) -> Any:
    """Every value a template prints, its control and format characters escaped but line breaks and tabs, as the
    console shows text read from files (a class name's escape sequence would recolour or retitle the terminal that
    shows report.md; HTML and Markdown are escaped apart). Markup built by the code stays markup."""
    if isinstance(value, markupsafe.Markup):
        return markupsafe.Markup(str(value).translate(LINES_ESCAPES))
    return value.translate(LINES_ESCAPES) if isinstance(value, str) else value


def gather(run_dir: Path, saved: dict[str, Any]) -> dict[str, Any]:
    """What the templates show, read from the run's files."""
    report = saved.get("report") if isinstance(saved.get("report"), dict) else {}
    lang = report.get("lang", "en") if report.get("lang") in WORDS else "en"
    metrics = saved.get("metrics") or {}
    per_class = _csv(run_dir / "per_class.csv")
    return {
        "t": WORDS[lang],
        "lang": lang,
        "run": {key: saved.get(key) for key in RECORDED} | {"seed": (saved.get("settings") or {}).get("seed")},
        # What a section the run has no files for says: not yet, or (test.py's report) that training was elsewhere.
        "missing": WORDS[lang]["tested_only" if saved.get("epochs") is None and saved.get("tested") else "not_yet"],
        "metrics": metrics,
        "title": saved.get("what_ran", {}).get("title") or run_dir.name,
        "network": _network(_json(run_dir / "network.json")),
        "untrained": _untrained(_json(run_dir / "untrained.json")),
        "epochs": [_epoch_row(row) for row in _csv(run_dir / "epochs.csv")],
        "units": _units((saved.get("what_ran") or {}).get("images")),
        "per_class": per_class,
        "test": _test_summary(per_class, metrics, report.get("target")),
        "confused": _confused(run_dir / "confusion.csv"),
        "pictures": {name: _picture(run_dir / name) for name in PICTURES if (run_dir / name).is_file()},
        "ln": math.log,
    } | {
        "sentences": _sentences(
            lang,
            _untrained(_json(run_dir / "untrained.json")),
            _test_summary(per_class, metrics, report.get("target")),
            (saved.get("settings") or {}).get("seed"),
        )
    }


def markdown_cell(value: Any) -> str:
    """Text that is data (a class name, an error) as one Markdown table cell or line: pipes, markup, entities, maths
    and line breaks escaped (HTML is escaped by Jinja2's autoescape)."""
    text = " ".join(str(value).split())
    for character in "\\|*_`[]<>#&$":
        text = text.replace(character, "\\" + character)
    return text


def markdown_code(value: Any) -> str:
    """Text that is data as one Markdown code span: fenced by more backticks than it holds in a row, so that none of
    it can close the span; on one line."""
    text = " ".join(str(value).split())
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""  # CommonMark strips one space each side
    return f"{fence}{pad}{text}{pad}{fence}"


def wilson(correct: int, total: int) -> tuple[float, float]:
    """The 95 % Wilson score interval of an accuracy of `correct` out of `total`."""
    if total == 0:
        return (0.0, 1.0)
    p = correct / total
    centre = (p + Z95**2 / (2 * total)) / (1 + Z95**2 / total)
    half = Z95 * math.sqrt(p * (1 - p) / total + Z95**2 / (4 * total**2)) / (1 + Z95**2 / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _test_summary(per_class: list[dict[str, str]], metrics: dict[str, Any], target: Any) -> dict[str, Any] | None:
    """The test in the notebook's units: correct of all test images, accuracy with its 95 % interval, mean and summed
    loss, the recipe's target and whether it is met. From per_class.csv (counts) and metrics.json (loss)."""
    if not per_class or metrics.get(record.TEST_ACC) is None:
        return None
    images = sum(int(row["images"]) for row in per_class)
    correct = sum(int(row["correct"]) for row in per_class)
    loss = metrics.get(record.TEST_LOSS)
    low, high = wilson(correct, images)
    return {
        "images": images,
        "correct": correct,
        "accuracy": metrics[record.TEST_ACC],
        "low": low,
        "high": high,
        "loss": loss,
        "summed_loss": None if loss is None else loss * images,
        "target": target,
        "met": None if target is None else metrics[record.TEST_ACC] > target,
    }


def _sentences(lang: str, untrained: dict[str, Any] | None, test: dict[str, Any] | None, seed: Any) -> dict[str, str]:
    """The report's sentences in `lang`, with the numbers the run recorded."""
    words, said = SENTENCES[lang], {"units": SENTENCES[lang]["units"]}
    if untrained:
        classes = untrained["classes"]
        said["before"] = words["before"].format(
            images=untrained["images"], loss=f"{untrained['loss']:.4f}", classes=classes, ln=f"{math.log(classes):.4f}",
            top=f"{untrained['mean_max_softmax']:.4f}", inverse=f"{1 / classes:.4f}", seed=seed,
        )  # fmt: skip
    if test:
        said["test"] = words["test"].format(
            correct=f"{test['correct']:,}", images=f"{test['images']:,}", accuracy=f"{100 * test['accuracy']:.2f} %",
            low=f"{100 * test['low']:.2f} %", high=f"{100 * test['high']:.2f} %",
            loss="" if test["loss"] is None else f"{test['loss']:.4f}",
            summed="" if test["summed_loss"] is None else f"{test['summed_loss']:.1f}",
        )  # fmt: skip
        if test["target"] is not None:
            met = words["met"] if test["met"] else words["not_met"]
            said["target"] = words["target"].format(target=f"{100 * test['target']:.2f} %", met=met)
    return said


def _untrained(scores: dict[str, Any] | None) -> dict[str, Any] | None:
    """untrained.json (cnn_exp/reports.py), when it holds the four numbers the report shows."""
    keys = ("images", "classes", "loss", "mean_max_softmax")
    if not scores or not all(isinstance(scores.get(key), int | float) for key in keys) or scores["classes"] < 2:
        return None
    return {key: scores[key] for key in keys}


def _network(network: dict[str, Any] | None) -> dict[str, Any] | None:
    """network.json (cnn_exp/layers.py) with each part the report shows, None where it has none."""
    if not network or not isinstance(network.get("rows"), list) or not network["rows"]:
        return None
    parts = ("title", "rows", "total", "unseen", "arithmetic", "forward")
    return {part: network.get(part) for part in parts}


def _units(images: Any) -> dict[str, int]:
    """The images each split served an epoch (metrics.json's what_ran.images), where the record knows them."""
    if not isinstance(images, dict):
        return {}
    return {
        split: count
        for split, count in images.items()
        if split in ("train", "val") and isinstance(count, int) and count > 0
    }


def _epoch_row(row: dict[str, str]) -> dict[str, Any]:
    return {key: (float(value) if value not in ("", None) else None) for key, value in row.items()}


def _confused(path: Path, count: int = 5) -> list[dict[str, Any]]:
    """The most confused pairs (true, predicted, images, share of the true class) from confusion.csv's counts, read
    by position: row i and column i are class i, whatever the classes are called."""
    try:
        with open(path, newline="") as f:
            header, *rows = list(csv.reader(f))
    except (OSError, ValueError, csv.Error):
        return []
    names = header[1:]
    pairs = []
    for i, row in enumerate(rows):
        counts = [int(value) for value in row[1:]]
        total = sum(counts)
        pairs += [
            {"true": names[i], "predicted": names[j], "images": n, "share": n / max(total, 1)}
            for j, n in enumerate(counts)
            if j != i and n
        ]
    return sorted(pairs, key=lambda pair: -pair["images"])[:count]


def _picture(path: Path) -> dict[str, str]:
    return {"file": path.name, "data": base64.b64encode(path.read_bytes()).decode("ascii")}


def _csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def _json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None
