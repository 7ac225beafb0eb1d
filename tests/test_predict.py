"""Using a trained network: test.py predict= on image files, cnn_exp.load in Python, and test.py export=onnx."""

import csv
import logging
import subprocess
from io import BytesIO
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image
from torchvision.datasets import MNIST, FashionMNIST

import cnn_exp
from cnn_exp import export, predict
from cnn_exp.checkpoints import SafeCheckpointIO
from cnn_exp.classifier import Classifier
from cnn_exp.data import MNISTDataModule
from cnn_exp.errors import UserError
from cnn_exp.images import frame
from tests.conftest import MIRROR, ROOT, composed, run
from tests.test_classifier import net

FILES = 40  # test images saved as files, each both as stored and as drawn


def data_module(dataset: str, data_dir: Path) -> MNISTDataModule:
    """The dataset's own settings (conf/data), on the small data."""
    name = {"MNIST": "mnist", "FashionMNIST": "fashion"}[dataset]
    settings = composed("data", name, data_dir=str(data_dir), mirror=str(MIRROR), seed=0, val_size=0)
    settings.pop("_target_")
    return MNISTDataModule(**settings)


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A checkpoint of Network2 that knows the small data's digits (about 90% of its test images right).

    The session's `trained` run is too weak for this (about 40%, with its top class rarely above 20%): whether a
    file is framed right would drown in its noise. Trained in-process and saved the way train.py saves its
    checkpoints (Lightning with cnn_exp's checkpoint I/O), in a few seconds.
    """
    L.seed_everything(0)
    model = Classifier(net=net("net2"), optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.003})
    trainer = L.Trainer(
        max_epochs=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[SafeCheckpointIO()],
        default_root_dir=tmp_path_factory.mktemp("network"),
    )
    trainer.fit(model, datamodule=data_module("MNIST", data_dir))
    path = Path(trainer.default_root_dir) / "network.ckpt"
    trainer.save_checkpoint(path)
    return path


def config(tmp_path: Path, *overrides: str) -> DictConfig:
    """test.py's config, composed as Hydra composes it for `python test.py <overrides>`."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("test", overrides=[f"paths.output_dir={tmp_path}", *overrides])


def drawn(image: np.ndarray, i: int) -> Image.Image:
    """An MNIST digit as a person would draw it: dark ink on light-grey paper, 3 to 7 times larger, off-centre on
    a larger page, saved in colour."""
    scale = 3 + i % 5
    ink = np.asarray(Image.fromarray(image).resize((28 * scale, 28 * scale), Image.Resampling.BICUBIC)) / 255
    page = np.full((28 * scale + 60, 56 * scale), 235.0)
    top, left = (i * 7) % 60, (i * 37) % (28 * scale)
    page[top : top + 28 * scale, left : left + 28 * scale] -= (235 - 20) * ink
    return Image.fromarray(page.astype(np.uint8)).convert("RGB")


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {Path(row["file"]).name: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def predicted(network: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """FILES test images that the network classifies right as tensors, saved as files both as stored (PNG) and
    as drawn (JPEG), and predicted by `test.py predict=<folder>`: (folder, run directory, labels by file)."""
    model = cnn_exp.load(network)
    test = MNIST(data_dir, train=False)
    with torch.inference_mode():
        known = model.model(model.normalize(test.data / 255)).argmax(dim=1) == test.targets
    # Images the network gets wrong even as the dataset stores them say nothing about how files are read.
    chosen = known.nonzero().flatten()[:FILES].tolist()
    assert len(chosen) == FILES
    folder = tmp_path_factory.mktemp("images")
    labels = {}
    for n, i in enumerate(chosen):
        digit, label = test.data[i].numpy(), str(int(test.targets[i]))
        Image.fromarray(digit).save(folder / f"stored{i:03d}.png")
        drawn(digit, n).save(folder / f"drawn{i:03d}.jpg", quality=80)
        labels |= {f"stored{i:03d}.png": label, f"drawn{i:03d}.jpg": label}
    run_dir = tmp_path_factory.mktemp("predicted")
    predict.run(config(run_dir, f"ckpt_path={network}", f"predict={folder}"))
    return folder, run_dir, labels


@pytest.mark.slow  # the `network` fixture trains for ~6 s
def test_images_saved_as_files_get_their_classes_stored_or_drawn(predicted: tuple[Path, Path, dict]) -> None:
    _, run_dir, labels = predicted
    rows = read_csv(run_dir / "predictions.csv")
    assert set(rows) == set(labels)
    for kind, least in (("stored", FILES - 1), ("drawn", FILES - 4)):
        right = [name for name in labels if name.startswith(kind) and rows[name]["predicted"] == labels[name]]
        assert len(right) >= least, f"{kind}: {len(right)} of {FILES} right"
    for row in rows.values():
        top = [pair.split("=") for pair in row["top3"].split("; ")]
        assert len(top) == 3 and top[0] == [row["predicted"], row["probability"]]
        assert float(top[0][1]) >= float(top[1][1]) >= float(top[2][1])
    assert (run_dir / "predictions.png").stat().st_size > 10_000


@pytest.mark.slow  # the `network` fixture trains for ~6 s
def test_the_python_loader_gives_the_probabilities_predict_writes(
    predicted: tuple[Path, Path, dict], network: Path, data_dir: Path
) -> None:
    folder, run_dir, _ = predicted
    model = cnn_exp.load(network)
    assert model.classes == [str(digit) for digit in range(10)] and (model.mean, model.std) == (0.1307, 0.3081)
    files = sorted(folder.iterdir())
    for file, top in zip(files, model.top(model.predict(files)), strict=True):
        row = read_csv(run_dir / "predictions.csv")[file.name]
        assert row["top3"] == "; ".join(f"{name}={p:.4f}" for name, p in top)
    # A dataset image as a tensor, an array or a Pillow image is framed exactly as its file is.
    test = MNIST(data_dir, train=False)
    stored = [file for file in files if file.name.startswith("stored")][:5]
    indices = [int(file.stem.removeprefix("stored")) for file in stored]
    expected = model.prepare(stored)
    pixels = test.data[indices]
    torch.testing.assert_close(model.prepare(pixels.unsqueeze(1)), expected, rtol=0, atol=0)
    torch.testing.assert_close(model.prepare(pixels / 255), expected, rtol=0, atol=0)
    torch.testing.assert_close(model.prepare([Image.fromarray(p.numpy()) for p in pixels]), expected, rtol=0, atol=0)
    torch.testing.assert_close(model.prepare(list(pixels.numpy())), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dataset", ["MNIST", "FashionMNIST"])
def test_framing_gives_back_a_dataset_image_as_stored_and_as_drawn(dataset: str, data_dir: Path) -> None:
    data_module(dataset, data_dir).prepare_data()
    images = {"MNIST": MNIST, "FashionMNIST": FashionMNIST}[dataset](data_dir, train=False).data[:100]
    stored = torch.stack([frame(Image.fromarray(image.numpy()), dataset) for image in images])
    difference = (stored - images / 255).abs()
    # Most come back pixel for pixel; the others moved by a pixel (the rounding of their centre) or were refitted.
    assert (difference.amax(dim=(1, 2)) <= 1 / 255 + 1e-6).float().mean() >= 0.7
    assert difference.mean() < 0.02
    framed = torch.stack([frame(drawn(image.numpy(), i), dataset) for i, image in enumerate(images)])
    assert (framed - stored).abs().mean() < 0.06, "a drawing is framed like the image it was drawn from"
    assert (framed - torch.roll(stored, 1, dims=0)).abs().mean() > 0.1, "and unlike another one"


@pytest.mark.slow
def test_bad_files_are_named_and_the_rest_predicted(
    network: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    Image.fromarray(np.pad(np.full((12, 4), 255, np.uint8), 8)).save(folder / "one.png")
    (folder / "notes.txt").write_text("not a picture")
    whole = (folder / "one.png").read_bytes()
    (folder / "broken.png").write_bytes(whole[: len(whole) // 2])
    (folder / "empty.bmp").write_bytes(b"")
    Image.new("L", (50, 50), 255).save(folder / "blank.png")
    (folder / ".hidden").write_text("ignored")
    with caplog.at_level(logging.WARNING):
        predict.run(config(tmp_path / "run", f"ckpt_path={network}", f"predict={folder}"))
    assert list(read_csv(tmp_path / "run" / "predictions.csv")) == ["one.png"]
    skipped = "\n".join(record.getMessage() for record in caplog.records)
    for name, reason in {
        "notes.txt": "not an image",
        "broken.png": "damaged or truncated",
        "empty.bmp": "not an image",
        "blank.png": "blank",
    }.items():
        assert f"{folder / name}: {reason}" in skipped
    assert ".hidden" not in skipped

    (tmp_path / "none").mkdir()
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "notes.txt").write_text("not a picture")
    photo = BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)).save(photo, "JPEG")
    (only_bad / "scan.jpg").write_bytes(photo.getvalue()[: len(photo.getvalue()) // 2])
    cfg = config(tmp_path / "bad", f"ckpt_path={network}")
    for spec, message in {
        folder / "notes.txt": f"predict={folder / 'notes.txt'}: not an image",
        folder / "broken.png": f"predict={folder / 'broken.png'}: damaged or truncated",
        tmp_path / "missing.png": f"predict={tmp_path / 'missing.png'}: no such file or folder",
        folder / "*.gif": f"predict={folder / '*.gif'}: the pattern matches no file",
        tmp_path / "none": f"predict={tmp_path / 'none'}: the folder holds no files",
        only_bad: f"predict={only_bad}: none is an image it can read: {only_bad / 'notes.txt'}: not an image (Pillow "
        f"cannot read it as PNG, JPEG, BMP or another format); {only_bad / 'scan.jpg'}: damaged or truncated",
        "": "predict= needs an image file",
    }.items():
        cfg.predict = str(spec)
        with pytest.raises(UserError) as error:
            predict.run(cfg)
        assert message in str(error.value)
    cfg.export = "onnx"
    with pytest.raises(UserError, match="two separate runs"):
        predict.run(cfg)
    with pytest.raises(UserError, match="cannot be read"):
        cnn_exp.load(folder / "notes.txt")
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_test_py_predicts_a_folder_and_a_bad_file_is_one_error_line(
    network: Path, predicted: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    folder = tmp_path / "two"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a picture")
    (folder / "digit.png").write_bytes((predicted[0] / sorted(predicted[2])[0]).read_bytes())
    proc = run("test.py", f"ckpt_path={network}", f"predict={folder}", f"hydra.run.dir={tmp_path / 'run'}")
    assert "predictions" in proc.stdout and "digit.png" in proc.stdout
    assert f"skipped {folder / 'notes.txt'}: not an image" in proc.stdout + proc.stderr
    assert list(read_csv(tmp_path / "run" / "predictions.csv")) == ["digit.png"]
    assert (tmp_path / "run" / "predictions.png").is_file()

    bad = f"predict={folder / 'notes.txt'}"
    proc = run("test.py", f"ckpt_path={network}", bad, f"hydra.run.dir={tmp_path / 'bad'}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: predict={folder / 'notes.txt'}: not an image")


@pytest.mark.slow
def test_export_writes_an_onnx_model_that_matches_pytorch(
    network: Path, data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import onnxruntime

    with pytest.raises(UserError, match="the one format is onnx"):
        export.run(config(tmp_path, f"ckpt_path={network}", "export=tflite"))
    data = [f"paths.data_dir={data_dir}", f"paths.data_mirror={MIRROR}"]
    with caplog.at_level(logging.INFO, logger="cnn_exp.export"):
        export.run(config(tmp_path, f"ckpt_path={network}", "export=onnx", *data))
    assert "ONNX Runtime's logits match PyTorch's on 100 test images" in caplog.text
    # Without its test images the check runs on random ones, and says so.
    caplog.clear()
    missing = [f"paths.data_dir={tmp_path / 'none'}", "paths.data_mirror=null"]
    with caplog.at_level(logging.INFO, logger="cnn_exp.export"):
        export.run(config(tmp_path / "random", f"ckpt_path={network}", "export=onnx", *missing))
    assert "checking the export on random images, not test images" in caplog.text
    assert "match PyTorch's on 100 random images" in caplog.text and "test images (largest" not in caplog.text

    session = onnxruntime.InferenceSession(tmp_path / "model.onnx", providers=["CPUExecutionProvider"])
    metadata = session.get_modelmeta().custom_metadata_map
    model = cnn_exp.load(network)
    assert metadata["classes"] == '["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]'
    assert (float(metadata["mean"]), float(metadata["std"]), metadata["dataset"]) == (0.1307, 0.3081, "MNIST")
    images = model.normalize(MNIST(data_dir, train=False).data[:37] / 255)
    with torch.inference_mode():
        expected = model.model(images).numpy()
    for batch in (images[:1], images):  # any batch size
        (logits,) = session.run(["logits"], {"images": batch.numpy()})
        np.testing.assert_allclose(logits, expected[: len(batch)], rtol=export.TOLERANCE, atol=export.TOLERANCE)

    # A network trained with flip averaging answers as test.py does, from the ONNX file too.
    checkpoint = torch.load(network, weights_only=True)
    checkpoint["hyper_parameters"]["flip_average"] = True
    torch.save(checkpoint, tmp_path / "flip.ckpt")
    export.run(config(tmp_path / "flip", f"ckpt_path={tmp_path / 'flip.ckpt'}", "export=onnx", *data))
    session = onnxruntime.InferenceSession(tmp_path / "flip" / "model.onnx", providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        expected = cnn_exp.load(tmp_path / "flip.ckpt").model.scores(images).numpy()
        assert not np.allclose(expected, model.model(images).numpy(), atol=1e-3)
    (logits,) = session.run(["logits"], {"images": images.numpy()})
    np.testing.assert_allclose(logits, expected, rtol=export.TOLERANCE, atol=export.TOLERANCE)


@pytest.mark.parametrize("size", ["-1", "0", "1.5", "true", "many"])
def test_a_batch_size_below_1_is_refused_before_any_work(size: str, tmp_path: Path) -> None:
    # Neither the checkpoint nor the images exist: only a check made before any work can answer first.
    cfg = config(
        tmp_path / "run", f"ckpt_path={tmp_path / 'missing.ckpt'}", f"predict={tmp_path}", f"batch_size={size}"
    )
    with pytest.raises(UserError) as error:
        predict.run(cfg)
    assert str(error.value) == f"batch_size={cfg.batch_size} must be a whole number of at least 1, or null"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_writing_onto_a_folder_or_an_immutable_file_is_one_error_line(
    trained: Path, tmp_path: Path, data_dir: Path
) -> None:
    checkpoint = trained / "checkpoints" / "last.ckpt"
    data = [f"paths.data_dir={data_dir}", f"paths.data_mirror={MIRROR}"]
    (tmp_path / "folder" / "model.onnx").mkdir(parents=True)
    proc = run(
        "test.py", f"ckpt_path={checkpoint}", "export=onnx", f"hydra.run.dir={tmp_path / 'folder'}", *data, check=False
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'folder' / 'model.onnx'} is a folder, where this run writes its file: move the folder "
        "away, or give the run another directory (hydra.run.dir=...)"
    )
    (tmp_path / "predicted" / "predictions.png").mkdir(parents=True)
    with pytest.raises(UserError, match=r"predictions\.png is a folder"):  # before the checkpoint is read
        predict.run(config(tmp_path / "predicted", f"ckpt_path={tmp_path / 'missing.ckpt'}", f"predict={tmp_path}"))

    # Root writes where chmod forbids it; an immutable file (chattr +i) stops root too.
    target = tmp_path / "immutable" / "model.onnx"
    target.parent.mkdir()
    target.write_bytes(b"an older export")
    if subprocess.run(["chattr", "+i", target], capture_output=True).returncode:
        pytest.skip("chattr +i does not work here (not installed, or a filesystem without the immutable attribute)")
    try:
        with pytest.raises(UserError) as error:
            export.run(config(target.parent, f"ckpt_path={checkpoint}", "export=onnx", *data))
    finally:
        subprocess.run(["chattr", "-i", target], check=True)
    assert str(error.value) == (
        f"cannot write {target} (Operation not permitted): give the run a directory it can write to (hydra.run.dir=...)"
    )
    assert target.read_bytes() == b"an older export"


def test_an_array_as_pillow_holds_a_colour_image_is_one_image() -> None:
    (image,) = predict._pictures(np.zeros((64, 48, 3), np.uint8))  # H×W×C: np.asarray(Image.open(colour file))
    assert image.size == (48, 64) and image.mode == "RGB"
    assert len(predict._pictures(np.zeros((5, 28, 28), np.uint8))) == 5  # N×H×W, as torchvision holds MNIST
