"""A dataset's four IDX files in data_dir: filled from the mirror or torchvision's download, their headers and MD5s
checked before any training, each file copied whole or not at all. Dataset files are input: what a file must be
(its header, the official MD5s) is written here, never read from a file."""

import gzip
import hashlib
import json
import logging
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from filelock import FileLock, Timeout
from torchvision.datasets import MNIST, FashionMNIST
from torchvision.datasets.mnist import read_label_file

from cnn_exp import atomic
from cnn_exp.errors import UserError

log = logging.getLogger(__name__)

# torchvision's classes know each dataset's folder name, files and class names; the two differ in data only.
DATASETS: dict[str, type[MNIST]] = {"MNIST": MNIST, "FashionMNIST": FashionMNIST}

# Both datasets' images are 28×28 and grey; their splits' files start with these names and, in the official files,
# hold this many images.
IMAGE_SIZE = 28


SPLITS = {"train": 60_000, "t10k": 10_000}


# The MD5s of the decompressed official files, as published with the datasets (and listed in
# ../shared/datasets/README.md). Kept here as data: what a file must be is never read from a file.
OFFICIAL_MD5 = {
    "6bbc9ace898e44ae57da46a324031adb": ("MNIST", "train-images-idx3-ubyte"),
    "a25bea736e30d166cdddb491f175f624": ("MNIST", "train-labels-idx1-ubyte"),
    "2646ac647ad5339dbf082846283269ea": ("MNIST", "t10k-images-idx3-ubyte"),
    "27ae3e4e09519cfbb04c329615203637": ("MNIST", "t10k-labels-idx1-ubyte"),
    "f4a8712d7a061bf5bd6d2ca38dc4d50a": ("FashionMNIST", "train-images-idx3-ubyte"),
    "9018921c3c673c538a1fc5bad174d6f9": ("FashionMNIST", "train-labels-idx1-ubyte"),
    "8181f5470baa50b63fa0f6fddb340f0a": ("FashionMNIST", "t10k-images-idx3-ubyte"),
    "15d484375f8d13e6eb1aabb0c3f46965": ("FashionMNIST", "t10k-labels-idx1-ubyte"),
}


# Beside the files in data_dir: the MD5 each file had when it was checked, with the size, times and inode it had
# then, so that an unchanged file is not read again on every run. It can spare a check, nothing more.
CHECKED = ".checked.json"


# Taken while data_dir is filled: runs started together wait for one another instead of copying over each other.
LOCK = ".fill.lock"


CHUNK = 1 << 20


def split_files(split: str) -> tuple[str, str]:
    """The images file and the labels file of a split ("train" or "t10k")."""
    return f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"


def idx_size(name: str, head: bytes) -> int | None:
    """The size in bytes that the header `head` of the IDX file `name` announces; None if `head` is too short to
    hold a header. For a header that idx_problem accepts: header, then one byte per pixel or label."""
    header = 16 if "images" in name else 8
    if len(head) < header:
        return None
    return header + int.from_bytes(head[4:8], "big") * (IMAGE_SIZE * IMAGE_SIZE if header == 16 else 1)


def idx_problem(name: str, head: bytes, size: int) -> str | None:
    """What is wrong with the IDX file `name` of `size` bytes that starts with `head`; None if its header fits.

    We read the 16-byte headers ourselves only to check them early: torchvision decodes a split when it is loaded,
    so a bad test file would otherwise be found at the final test, after all the training.
    """
    dims = 3 if "images" in name else 1
    what = "images" if dims == 3 else "labels"
    header = 4 + 4 * dims
    if size == 0:
        return "is empty (0 bytes)"
    if len(head) < header:
        return f"is too short to be an IDX file ({size} bytes)"
    magic, count, *shape = struct.unpack(f">{1 + dims}I", head[:header])
    if magic != 0x800 + dims:  # unsigned bytes (0x08) in `dims` dimensions
        return f"is not an IDX file of {what} (it starts with {magic:#010x}, not {0x800 + dims:#010x})"
    if shape and shape != [IMAGE_SIZE, IMAGE_SIZE]:
        return f"holds {shape[0]}×{shape[1]} images, not the datasets' {IMAGE_SIZE}×{IMAGE_SIZE}"
    if count == 0:
        return f"holds no {what}"
    expected = idx_size(name, head)
    if size < expected:
        return f"is truncated: its header announces {count} {what} ({expected} bytes) but it has {size} bytes"
    if size > expected:
        return f"has {size - expected} bytes more than the {count} {what} its header announces"
    return None


def _stamp(stat: os.stat_result) -> list[int]:
    """What changes whenever a file is written or replaced: an unchanged stamp means unchanged contents."""
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def _open(source: Path, origin: str, fix: str) -> IO[bytes]:
    """A mirror's or download's file, decompressed as it is read if it ends in .gz."""
    try:
        return gzip.open(source) if source.suffix == ".gz" else open(source, "rb")
    except OSError as err:
        raise UserError(f"cannot read {origin}: {err}: {fix}") from None


def _read(source: IO[bytes], origin: str, fix: str, size: int = CHUNK) -> bytes:
    """The next `size` bytes of a mirror's or download's file (fewer at its end); a damaged one becomes a UserError
    naming it."""
    try:
        return source.read(size)
    except (OSError, EOFError, zlib.error) as err:  # a truncated or corrupt .gz, an unreadable file
        raise UserError(f"cannot read {origin}: {err}: {fix}") from None


@dataclass
class RawFiles:
    """The IDX files of `dataset` in data_dir/<dataset>/raw, and how to fill and check them."""

    dataset: str
    data_dir: str
    mirror: str | None
    download: bool
    verify: bool
    classes: int  # how many class names the data has: a label past the last is refused

    @property
    def raw_dir(self) -> Path:
        return Path(self.data_dir) / self.dataset / "raw"

    def prepare(self) -> None:
        """Make sure data_dir holds the four IDX files, and that they are what their names say, before any training.

        Missing files come from the mirror, else from torchvision's download. Then every file's header is checked,
        and (data.verify) its MD5 against the official files': another dataset's or split's file is refused by
        name; a file with an unknown MD5 is accepted as a subset of one's own, with a warning, unless it holds as
        many images as the official file (then it is a damaged copy or another dataset).
        """
        if self._missing_files():
            self._fill()
        counts = self._check_headers()
        if self.verify:
            self._check_checksums(counts)

    def checked_md5s(self) -> dict[str, str]:
        """The files' MD5s as checked (remembered beside them), by file name: the run's provenance."""
        names = [name for split in SPLITS for name in split_files(split)]
        return {name: entry["md5"] for name, entry in sorted(self._checked().items()) if name in names}

    def _missing_files(self) -> list[str]:
        return [name for split in SPLITS for name in split_files(split) if not (self.raw_dir / name).is_file()]

    def _fill(self) -> None:
        """Copy the missing files from the mirror, else download them; one run at a time fills a data_dir."""
        dataset, mirror, download_error = self.dataset, self.mirror, "off (data.download=false)"
        try:
            self.raw_dir.mkdir(parents=True, exist_ok=True)
            lock = FileLock(self.raw_dir / LOCK)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                log.info("waiting for another run that is filling %s", self.raw_dir)
                lock.acquire()
        except OSError as err:
            raise UserError(f"cannot write to paths.data_dir={self.data_dir}: {err}") from None
        try:
            # Left by a run killed while copying. Under the lock no other run is copying, so none is in use.
            for name in self._missing_files():
                for stale in self.raw_dir.glob(f".{name}.*.tmp"):
                    stale.unlink(missing_ok=True)
            if mirror and self._missing_files():  # another run may have filled it while this one waited
                self._copy_all(Path(mirror) / dataset / "raw", "the mirror's", "fix or replace it in the mirror")
            if self._missing_files() and self.download:
                with tempfile.TemporaryDirectory(dir=self.data_dir) as tmp:
                    try:
                        DATASETS[dataset](tmp, train=False, download=True)
                    except Exception as err:  # no network, a proxy, a bad archive: each ends in the message below
                        download_error = "failed: " + str(err).strip().splitlines()[-1]
                    else:
                        self._copy_all(Path(tmp) / dataset / "raw", "the downloaded", "try again later")
        finally:
            lock.release()
        if missing := self._missing_files():
            raise UserError(
                f"{dataset} files missing from {self.raw_dir}: {', '.join(missing)}; "
                f"paths.data_mirror: "
                + (f"{Path(mirror) / dataset / 'raw'} does not hold them (plain or .gz)" if mirror else "not set")
                + f"; download: {download_error}. "
                "Set paths.data_mirror (or the CNN_EXP_DATA_MIRROR variable) to a folder laid out as "
                f"<dir>/{dataset}/raw/*.gz, or paths.data_dir to a folder that already holds the files."
            )

    def _copy_all(self, source_dir: Path, origin: str, fix: str) -> None:
        """Copy (or decompress) each missing file from `source_dir`, checked on the way, and remember their MD5s."""
        for name in self._missing_files():
            for source in (source_dir / f"{name}.gz", source_dir / name):
                if source.is_file():
                    self._remember({name: self._copy(source, name, f"{origin} {source}", fix)})
                    log.info("copied %s from %s", name, source)
                    break

    def _copy(self, source: Path, name: str, origin: str, fix: str) -> dict[str, Any]:
        """Stream one file into data_dir, computing its MD5; it appears there whole and checked, or not at all.

        The header is read and checked first, and nothing past the size it announces is ever written: a .gz of a
        few hundred KB may decompress to gigabytes (damaged, or made to fill the disk), and is refused one chunk
        past that size, naming the file, instead of filling data_dir's disk and blaming its free space.
        """
        target, digest = self.raw_dir / name, hashlib.md5()
        try:
            with atomic.replace(target, "wb") as out, _open(source, origin, fix) as opened:
                head = _read(opened, origin, fix, 16)  # all of it if shorter: read() stops early only at the end
                announced = idx_size(name, head)
                # The header alone, as if the file had the size it announces (a head too short for one is all of it).
                if problem := idx_problem(name, head, announced or len(head)):
                    raise UserError(f"{origin} {problem}: {fix}")
                chunk, size = head, 0
                while chunk:
                    size += len(chunk)
                    if size > announced:  # stop reading: the rest may be gigabytes
                        raise UserError(f"{origin} is longer than the {announced} bytes its header announces: {fix}")
                    digest.update(chunk)
                    out.write(chunk)
                    chunk = _read(opened, origin, fix)
                problem = idx_problem(name, head, size)
                if not problem and self.verify:
                    problem = self._identity_problem(name, digest.hexdigest(), int.from_bytes(head[4:8], "big"))
                if problem:  # raised inside: atomic.replace then leaves nothing in data_dir
                    raise UserError(f"{origin} {problem}: {fix}")
        except OSError as err:  # writing: a full disk, a file-size limit, a read-only data_dir
            raise UserError(
                f"cannot write {target}: {err.strerror or err}: free space or choose another paths.data_dir"
            ) from None
        return {"stamp": _stamp(target.stat()), "md5": digest.hexdigest()}

    def _check_headers(self) -> dict[str, int]:
        """Both splits' headers, image and label counts and label values, before training: {split: images}."""
        counts, redo = {}, "delete it, and the next run copies it again from the mirror or the download"
        for split in SPLITS:
            for name in split_files(split):
                path = self.raw_dir / name
                try:
                    with open(path, "rb") as f:
                        head, size = f.read(16), os.fstat(f.fileno()).st_size
                except OSError as err:  # another user's file without read permission, a directory by that name
                    raise UserError(f"cannot read {path}: {err.strerror or err}") from None
                if problem := idx_problem(name, head, size):
                    raise UserError(f"{path} {problem}: {redo}")
                counts.setdefault(split, []).append(int.from_bytes(head[4:8], "big"))
            images, labels = counts[split]
            if images != labels:
                raise UserError(
                    f"{split}-images-idx3-ubyte and -labels-idx1-ubyte in {self.raw_dir} disagree: {images} images "
                    f"but {labels} labels: delete them, and the next run copies them again from the mirror or the "
                    "download (if they disagree there too, its copies are damaged)"
                )
            # A label past the last class would stop training at its first batch with a traceback (60 KB to read).
            path = self.raw_dir / split_files(split)[1]
            if (top := int(read_label_file(str(path)).max())) >= self.classes:
                raise UserError(f"{path} holds label {top}, but data.classes names {self.classes} classes: {redo}")
        return {split: images for split, (images, _) in counts.items()}

    def _check_checksums(self, counts: dict[str, int]) -> None:
        """Each file's MD5, computed once per version of the file: refuse the wrong files, warn of unknown ones."""
        checked, fresh, unknown, problems = self._checked(), {}, [], []
        for split, count in counts.items():
            for name in split_files(split):
                path = self.raw_dir / name
                entry = checked.get(name)
                if entry is None or entry["stamp"] != _stamp(path.stat()):
                    with open(path, "rb") as f:
                        digest = hashlib.file_digest(f, "md5")
                        entry = fresh[name] = {"stamp": _stamp(os.fstat(f.fileno())), "md5": digest.hexdigest()}
                if problem := self._identity_problem(name, entry["md5"], count):
                    problems.append(f"{path} {problem}")
                elif entry["md5"] not in OFFICIAL_MD5:
                    unknown.append(name)
        self._remember(fresh)
        if problems:
            more = f" (and {len(problems) - 1} more of its files)" if len(problems) > 1 else ""
            raise UserError(
                f"{problems[0]}{more}: delete the wrong files in {self.raw_dir}, and the next run copies "
                f"{self.dataset}'s again from the mirror or the download"
            )
        if unknown:
            log.warning(
                "%s: %d of the %s files are not the official ones (unknown MD5); used as a subset of %d training and "
                "%d test images",
                self.raw_dir, len(unknown), self.dataset, counts["train"], counts["t10k"],
            )  # fmt: skip

    def _identity_problem(self, name: str, md5: str, count: int) -> str | None:
        """What is wrong with a file of `count` images or labels by its MD5: another official file's, or a damaged
        copy of a full split. None: the official file, or a subset (unknown MD5, fewer images)."""
        dataset = self.dataset
        official = OFFICIAL_MD5.get(md5)
        if official:
            return None if official == (dataset, name) else f"is {official[0]}'s {official[1]}, not {dataset}'s {name}"
        if count == SPLITS[name.split("-")[0]]:
            return (
                f"has as many entries ({count}) as {dataset}'s official {name} but another MD5 ({md5}): "
                "a damaged copy, or another dataset (data.verify=false takes it as it is)"
            )
        return None

    def _checked(self) -> dict[str, dict[str, Any]]:
        """The MD5s remembered beside the files; entries of any other shape are ignored (then checked again)."""
        try:
            record = json.loads((self.raw_dir / CHECKED).read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(record, dict):
            return {}
        return {
            name: entry
            for name, entry in record.items()
            if isinstance(entry, dict)
            and set(entry) == {"stamp", "md5"}
            and isinstance(entry["md5"], str)
            and isinstance(entry["stamp"], list)
        }

    def _remember(self, fresh: dict[str, dict[str, Any]]) -> None:
        """Add newly computed MD5s to the record beside the files; a read-only data_dir keeps none (checks again)."""
        if fresh:
            try:
                atomic.write_text(self.raw_dir / CHECKED, json.dumps(self._checked() | fresh, indent=1) + "\n")
            except OSError as err:
                log.debug("cannot remember the checked MD5s in %s: %s", self.raw_dir, err)
