"""The lab report (report.html, report.md): its sections, its numbers against the run's own record and files, a
self-contained HTML file, and a report for a failed run, a checkpoint tested alone, and turned off."""

import csv
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cnn_exp import record, report
from tests.conftest import read_metrics, run_here

SECTIONS = ["1. What ran", "2. The network", "3. Before training", "4. Training", "5. Test", "6. Inside the network"]


class Page(HTMLParser):
    """The text of an HTML page, and every address its tags load or link to."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.addresses: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.addresses += [value or "" for name, value in attrs if name in ("src", "href")]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def page(run_dir: Path) -> Page:
    parsed = Page()
    parsed.feed((run_dir / "report.html").read_text())
    return parsed


def pct(value: float) -> str:
    return f"{100 * value:.2f} %"


def test_a_finished_runs_report_has_every_section_and_the_records_numbers(trained: Path) -> None:
    html, markdown = page(trained), (trained / "report.md").read_text()
    text = " ".join(" ".join(html.text).split())
    for section in SECTIONS:
        assert section in text and f"## {section}" in markdown
    saved = read_metrics(trained)
    assert "status: finished" in text
    # Test: the counts of per_class.csv, the accuracy and loss of metrics.json.
    with open(trained / "per_class.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    correct, images = sum(int(r["correct"]) for r in rows), sum(int(r["images"]) for r in rows)
    accuracy = saved["metrics"]["test/acc"]
    assert f"{correct:,} of {images:,} test images right: accuracy {pct(accuracy)}" in text
    assert correct / images == pytest.approx(accuracy, abs=1e-6)  # two files of the run agree
    low, high = report.wilson(correct, images)
    assert f"(95 % interval {pct(low)} to {pct(high)})" in text
    assert f"loss {saved['metrics']['test/loss']:.4f} per image" in text
    # Training: every row of epochs.csv, as written.
    with open(trained / "epochs.csv", newline="") as f:
        for row in csv.DictReader(f):
            cells = f"{int(row['epoch'])} {float(row['train/loss']):.4f} {pct(float(row['train/acc']))}"
            assert cells in text, cells
    # In the notebook's units: the images right of those each split served an epoch (metrics.json says how many).
    served = saved["what_ran"]["images"]
    assert served == {"train": 800, "val": 200}  # the subset's 1,000 training images, 200 held out
    with open(trained / "epochs.csv", newline="") as f:
        for row in csv.DictReader(f):
            right = round(float(row["val/acc"]) * served["val"])
            assert f"{right:,}/200 {pct(float(row['val/acc']))} {float(row['val/loss']) * 200:.1f}" in text
    # Before training: untrained.json's numbers beside ln(classes) and 1/classes.
    untrained = json.loads((trained / "untrained.json").read_text())
    assert f"loss {untrained['loss']:.4f} against ln 10 = {math.log(10):.4f}" in text
    assert f"mean highest softmax score {untrained['mean_max_softmax']:.4f} against 1/10 = 0.1000" in text
    assert "| layer | type | input | output | weight | bias | parameters |\n|---|" in markdown  # a table GitHub renders
    # The network: its layer table, forward() as written, and provenance.
    assert "fc1 Linear 192 120 120×192" in text and "def forward(self" in text
    assert saved["provenance"]["versions"]["torch"] in text and "python train.py" in text
    # What ran names the settings the command does not show: the classifier's (loss, scoring), the callbacks.
    smoothing = OmegaConf.load(trained / "config.yaml").classifier.label_smoothing
    assert f"classifier label_smoothing={smoothing}, flip_average=False, shift_average=0" in text
    assert re.search(r"callbacks [\w, ]*model_checkpoint[\w, ]*epoch_table", text)


def test_the_html_report_is_one_self_contained_file_and_the_markdown_links_its_pictures(trained: Path) -> None:
    html = page(trained)
    assert html.addresses and all(address.startswith("data:image/png;base64,") for address in html.addresses)
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (trained / "report.md").read_text())
    assert {"curves.png", "confusion_matrix.png"} <= set(pictures)
    assert all((trained / picture).is_file() for picture in pictures)


def test_a_failed_run_has_a_report_that_says_so_first(paths: list[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit):  # what only the data reveals: the run has started, and fails
        run_here("train.py", tmp_path, *paths, "data.val_size=60000")
    assert read_metrics(tmp_path)["status"] == "failed"
    text = " ".join(" ".join(page(tmp_path).text).split())
    assert text.index("status: failed") < text.index("1. What ran")
    assert "data.val_size=60000 leaves no training images" in text
    assert "not yet: the run has not got this far" in text


def test_report_enabled_false_writes_none_and_lang_zh_the_labs_language(paths: list[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        run_here("train.py", tmp_path / "off", *paths, "data.val_size=60000", "report.enabled=false")
    assert not (tmp_path / "off" / "report.html").exists() and not (tmp_path / "off" / "report.md").exists()
    with pytest.raises(SystemExit):
        run_here("train.py", tmp_path / "zh", *paths, "data.val_size=60000", "report.lang=zh")
    assert "## 1. 运行内容" in (tmp_path / "zh" / "report.md").read_text()
    with pytest.raises(SystemExit, match=r"error: report\.lang=fr is not one of en, zh"):
        run_here("train.py", tmp_path / "fr", *paths, "report.lang=fr")


def test_the_labs_language_has_the_sentences_too() -> None:
    untrained = {"images": 100, "classes": 10, "loss": 2.31, "mean_max_softmax": 0.11}
    test = {"correct": 9897, "images": 10000, "accuracy": 0.9897, "low": 0.9875, "high": 0.9915, "loss": 0.03,
            "summed_loss": 300.0, "target": 0.9897, "met": False}  # fmt: skip
    said = report._sentences("zh", untrained, test, 0)
    assert said["before"].startswith("第一次更新之前，在 100 张训练图像上：损失 2.3100，对比 ln 10 = 2.3026")
    assert "10,000 张测试图像中 9,897 张分类正确：准确率 98.97 %" in said["test"] and said["target"].endswith(
        "未达到。"
    )


def test_text_that_is_data_cannot_change_the_markdown() -> None:
    assert report.markdown_cell("a|b\n# c *d*") == r"a\|b \# c \*d\*"
    assert report.markdown_cell("![x](http://e/x.png)") == r"!\[x\](http://e/x.png)"
    assert report.markdown_cell("&amp; $x$") == r"\&amp; \$x\$"
    assert report.markdown_code("a ``b`` c") == "```a ``b`` c```" and report.markdown_code("`x") == "`` `x ``"


def test_the_interval_is_wilsons() -> None:
    # The notebook's MNIST result; by hand: centre (p + z²/2n) / (1 + z²/n) = 0.98952, half-width 0.00199.
    low, high = report.wilson(9897, 10000)
    assert (round(low, 4), round(high, 4)) == (0.9875, 0.9915)
    assert report.wilson(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))


def test_train_log_holds_what_the_console_printed(trained: Path) -> None:
    log = (trained / "train.log").read_text()
    for printed in (
        "chosen",
        "│ conv1 ",
        "test accuracy per class",
        "most confused pairs",
        "finished in",
        "results in",
    ):
        assert printed in log, printed


def test_text_that_is_data_is_text_in_the_html_and_cannot_close_a_code_span(paths: list[str], tmp_path: Path) -> None:
    names = ["<script>alert(1)</script>", "`<h1>x</h1>", *map(str, range(8))]
    with pytest.raises(SystemExit):  # a run that fails once started: its report shows the command as typed
        run_here("train.py", tmp_path, *paths, "data.val_size=60000", f"data.classes=[{','.join(map(repr, names))}]")
    html = (tmp_path / "report.html").read_text()
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<h1>x</h1>" not in html
    markdown = (tmp_path / "report.md").read_text()
    command = next(line for line in markdown.splitlines() if "python train.py" in line)
    assert command.count("``") == 2 and command.split("``")[1].startswith("python train.py")  # fenced past its `


def test_damaged_files_of_a_run_are_a_warning_not_the_end_of_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    record.write(tmp_path, {"status": "finished", "metrics": {"test/acc": 0.9}, "report": "not a mapping"})
    (tmp_path / "epochs.csv").write_text("epoch,train/loss,train/acc\n1,abc,\n")
    (tmp_path / "per_class.csv").write_text("class,images,correct,accuracy\na,x,1,0.5\n")
    (tmp_path / "network.json").write_text('{"rows": [{"layer": "a"}], "total": "many", "arithmetic": 5}')
    report.write(tmp_path)  # no exception
    assert any("could not be written" in r.getMessage() for r in caplog.records)  # "abc" is no loss
    (tmp_path / "metrics.json").write_text("{not json")
    report.write(tmp_path)
    assert any("its metrics.json cannot be read" in r.getMessage() for r in caplog.records)


def test_confused_pairs_are_read_by_position_whatever_the_classes_are_called(tmp_path: Path) -> None:
    (tmp_path / "confusion.csv").write_text("true,true,false\ntrue,8,2\nfalse,1,9\n")  # a class called "true"
    pairs = report._confused(tmp_path / "confusion.csv")
    assert pairs == [
        {"true": "true", "predicted": "false", "images": 2, "share": 0.2},
        {"true": "false", "predicted": "true", "images": 1, "share": 0.1},
    ]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("report.enabled=no", r"report\.enabled=no must be true or false"),
        ("data.classes=[a,a,b,c,d,e,f,g,h,i]", r"data\.classes names 'a' more than once"),
        ("data.classes=[' ',b,c,d,e,f,g,h,i,j]", r"data\.classes\[0\] is empty"),
    ],
)
def test_settings_the_report_could_not_show_honestly_are_refused(
    paths: list[str], tmp_path: Path, override: str, message: str
) -> None:
    with pytest.raises(SystemExit, match=message):
        run_here("train.py", tmp_path, *paths, override)
