"""Verified, resumable fetching of the public archives the paper uses.

Checksums: where a public sum is known it is in the registry (md5 from the dataset
providers; sha256 where published). Where the sha256 is unknown the first verified
download records it in a lock file (`data/downloads.lock.json`), and every later use is
checked against that. A file that fails verification is renamed `<file>.bad` (kept for
inspection, never extracted; the next run downloads afresh) and a ChecksumError naming
expected and actual sums is raised.

Downloads go to `<file>.part`, resume with `Range: bytes=N-` after an interrupted
transfer (restarting cleanly when the server ignores Range), retry with exponential
backoff, and are renamed to the final name only after verification.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from bbam.atomic import atomic_write_text

USER_AGENT = "bbam-data/0.1 (+urllib)"
_NO_RETRY_CODES = {400, 401, 403, 404, 405, 410}


@dataclass(frozen=True)
class Archive:
    """One downloadable archive. `extract_to` is a folder name under the extraction root."""

    name: str
    urls: tuple[str, ...]
    filename: str
    sha256: str | None
    size: int | None
    extract_to: str
    md5: str | None = None


# Public md5 sums: VOC (devkit page / torchvision), SBD (torchvision SBDataset), COCO 2017
# (widely mirrored download scripts). No sha256 is published for any of them, and neither
# sizes nor sums are published for the MCG archives: those are recorded on first download.
ARCHIVES: dict[str, Archive] = {
    a.name: a
    for a in (
        Archive(
            name="voc2012_trainval",
            urls=("http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",),
            filename="VOCtrainval_11-May-2012.tar",
            sha256=None,
            size=None,
            extract_to="voc2012_trainval",
            md5="6cd6e144f989b92b3379bac3b3de84fd",
        ),
        Archive(
            name="sbd",
            urls=(
                "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/"
                "semantic_contours/benchmark.tgz",
            ),
            filename="benchmark.tgz",
            sha256=None,
            size=None,
            extract_to="sbd",
            md5="82b4d87ceb2ed10f6038a1cba92111cb",
        ),
        Archive(
            name="coco_train2017",
            urls=("http://images.cocodataset.org/zips/train2017.zip",),
            filename="train2017.zip",
            sha256=None,
            size=None,
            extract_to="coco_train2017",
            md5="cced6f7f71b7629ddf16f17bbcfab6b2",
        ),
        Archive(
            name="coco_val2017",
            urls=("http://images.cocodataset.org/zips/val2017.zip",),
            filename="val2017.zip",
            sha256=None,
            size=None,
            extract_to="coco_val2017",
            md5="442b8da7639aecaf257c1dceb8ba8c80",
        ),
        Archive(
            name="coco_annotations2017",
            urls=("http://images.cocodataset.org/annotations/annotations_trainval2017.zip",),
            filename="annotations_trainval2017.zip",
            sha256=None,
            size=None,
            extract_to="coco_annotations2017",
            md5="f4bbac642086de4f52a3fdda2de5fa2c",
        ),
        # MCG segment proposals (superpixels + labels), Pont-Tuset et al. project page.
        # "Main" covers the VOC2012 detection trainval+test images, which are 2008-2012 ones:
        # train_aug's 2007_* images come from the segmentation set only (the reference reads
        # them from a separate VOC2007 folder). "Segmentation" covers that set, 2007_* included.
        Archive(
            name="mcg_voc2012",
            urls=(
                "https://data.vision.ee.ethz.ch/jpont/mcg/"
                "MCG-Pascal-Main_trainvaltest_2012-proposals.tgz",
            ),
            filename="MCG-Pascal-Main_trainvaltest_2012-proposals.tgz",
            sha256=None,
            size=None,
            extract_to="mcg_voc2012",
        ),
        Archive(
            name="mcg_voc2012_segmentation",
            urls=(
                "https://data.vision.ee.ethz.ch/jpont/mcg/"
                "MCG-Pascal-Segmentation_trainvaltest_2012-proposals.tgz",
            ),
            filename="MCG-Pascal-Segmentation_trainvaltest_2012-proposals.tgz",
            sha256=None,
            size=None,
            extract_to="mcg_voc2012_segmentation",
        ),
        # COCO 2017 train/val are a reshuffle of 2014 train+val: both proposal sets are needed.
        Archive(
            name="mcg_coco_train2014",
            urls=("https://data.vision.ee.ethz.ch/jpont/mcg/MCG-COCO-train2014-proposals.tgz",),
            filename="MCG-COCO-train2014-proposals.tgz",
            sha256=None,
            size=None,
            extract_to="mcg_coco_train2014",
        ),
        Archive(
            name="mcg_coco_val2014",
            urls=("https://data.vision.ee.ethz.ch/jpont/mcg/MCG-COCO-val2014-proposals.tgz",),
            filename="MCG-COCO-val2014-proposals.tgz",
            sha256=None,
            size=None,
            extract_to="mcg_coco_val2014",
        ),
    )
}

# Which archives each dataset needs, by role (the keys prepare.py lays out).
DATASET_ARCHIVES: dict[str, dict[str, str]] = {
    "voc": {
        "voc": "voc2012_trainval",
        "sbd": "sbd",
        "mcg": "mcg_voc2012",
        "mcg_seg": "mcg_voc2012_segmentation",
    },
    "coco": {
        "train": "coco_train2017",
        "val": "coco_val2017",
        "annotations": "coco_annotations2017",
        "mcg_train": "mcg_coco_train2014",
        "mcg_val": "mcg_coco_val2014",
    },
}


@dataclass(frozen=True)
class DownloadConfig:
    """Retry/backoff knobs (tests use tiny backoffs)."""

    retries: int = 5
    backoff_s: float = 2.0
    backoff_max_s: float = 120.0
    timeout_s: float = 60.0
    chunk_bytes: int = 1 << 20
    progress: bool = True


class DownloadError(RuntimeError):
    """A file could not be fetched or found; the message names the file and the reason."""


class ChecksumError(DownloadError):
    """A file's content does not match its expected sum (it is never extracted)."""

    def __init__(self, path: Path, kind: str, expected: str, actual: str, moved_to: Path | None):
        self.path, self.kind, self.expected, self.actual = path, kind, expected, actual
        self.moved_to = moved_to
        where = f"; kept as {moved_to}" if moved_to else ""
        super().__init__(f"{path}: {kind} mismatch: expected {expected}, got {actual}{where}")


def file_digests(path: Path, chunk_bytes: int = 1 << 20) -> tuple[str, str, int]:
    """(sha256, md5, size) of a file in one pass."""
    sha, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            sha.update(chunk)
            md5.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), md5.hexdigest(), size


def write_json_atomic(path: Path, data: object) -> None:
    """Indented, sorted-key JSON (lock and summary files people read), written atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@dataclass
class LockFile:
    """sha256/size of each archive as first verified; later uses must match."""

    path: Path
    entries: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> LockFile:
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DownloadError(f"{path}: unreadable lock file ({e})") from e
        if not isinstance(data, dict) or not isinstance(data.get("archives", {}), dict):
            raise DownloadError(f"{path}: lock file must hold an 'archives' mapping")
        return cls(path, dict(data.get("archives", {})))

    def record(self, archive: Archive, sha256: str, size: int) -> None:
        # Re-read first so concurrent stages recording other archives are not lost.
        current = LockFile.load(self.path).entries
        current[archive.name] = {"filename": archive.filename, "sha256": sha256, "size": size}
        self.entries = current
        write_json_atomic(self.path, {"archives": current})

    def forget(self, archive: Archive, sha256: str) -> bool:
        """Drop the entry of `archive` if it locks `sha256` (a file refused after it was
        verified): a good archive put in its place must not then fail with a sha256
        mismatch against the refused one. Returns whether an entry was dropped."""
        current = LockFile.load(self.path).entries
        entry = current.get(archive.name)
        if not isinstance(entry, dict) or str(entry.get("sha256", "")).lower() != sha256.lower():
            return False
        del current[archive.name]
        self.entries = current
        write_json_atomic(self.path, {"archives": current})
        return True


def expected_sha256(archive: Archive, lock: LockFile | None) -> str | None:
    """The registry's sha256, else the locked one, else None (first download)."""
    if archive.sha256:
        return archive.sha256.lower()
    if lock is not None and archive.name in lock.entries:
        return str(lock.entries[archive.name]["sha256"]).lower()
    return None


def verify_file(
    path: Path, archive: Archive, lock: LockFile | None, *, quarantine: bool = True
) -> str:
    """Check size, md5 and sha256 against registry/lock; return the sha256.

    On mismatch the file is renamed `<name>.bad` (if `quarantine`) and ChecksumError raised.
    A first verified file whose sha256 was unknown is recorded in the lock.
    """
    sha, md5, size = file_digests(path)
    want_sha = expected_sha256(archive, lock)
    want_size = archive.size
    if want_size is None and lock is not None and archive.name in lock.entries:
        want_size = lock.entries[archive.name].get("size")
    checks = [
        ("size", str(want_size) if want_size is not None else None, str(size)),
        ("md5", archive.md5.lower() if archive.md5 else None, md5),
        ("sha256", want_sha, sha),
    ]
    for kind, want, got in checks:
        if want is not None and want != got:
            moved = None
            if quarantine:
                stem = path.name.removesuffix(".part")
                moved = path.with_name(stem + ".bad")
                os.replace(path, moved)
            raise ChecksumError(path, kind, want, got, moved)
    if lock is not None and archive.name not in lock.entries:
        lock.record(archive, sha, size)
    return sha


def _content_range_start(value: str | None) -> tuple[int | None, int | None]:
    """Parse 'bytes START-END/TOTAL' -> (START, TOTAL) (None where absent)."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    start = span.partition("-")[0]
    return (int(start) if start.isdigit() else None, int(total) if total.isdigit() else None)


def _fetch_once(url: str, part: Path, config: DownloadConfig, desc: str) -> None:
    """One HTTP request appending to `part` from its current size; raises on a short body."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=config.timeout_s)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            # Our .part is as long as (or longer than) the file: restart cleanly.
            part.unlink()
            raise ConnectionError(f"{url}: range {have}- not satisfiable, restarting") from e
        raise
    with resp:
        total: int | None = None
        length = resp.headers.get("Content-Length")
        if have and resp.status == 206:
            start, total = _content_range_start(resp.headers.get("Content-Range"))
            if start != have:
                part.unlink()
                raise ConnectionError(f"{url}: server resumed at {start}, not {have}; restarting")
            mode = "ab"
        else:
            have, mode = 0, "wb"  # 200: server ignored Range (or a fresh start)
            total = int(length) if length and length.isdigit() else None
        with (
            open(part, mode) as f,
            tqdm(
                total=total,
                initial=have,
                unit="B",
                unit_scale=True,
                desc=desc,
                disable=not config.progress,
            ) as bar,
        ):
            while chunk := resp.read(config.chunk_bytes):
                f.write(chunk)
                bar.update(len(chunk))
    got = part.stat().st_size
    if total is not None and got != total:
        raise ConnectionError(f"{url}: transfer ended at {got} of {total} bytes")


def http_download(url: str, part: Path, config: DownloadConfig, desc: str = "") -> None:
    """Fetch `url` into `part`, resuming and retrying with exponential backoff."""
    last: BaseException | None = None
    for attempt in range(config.retries + 1):
        try:
            _fetch_once(url, part, config, desc or part.name)
            return
        except urllib.error.HTTPError as e:
            if e.code in _NO_RETRY_CODES:
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
            last = e
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            last = e
        if attempt < config.retries:
            time.sleep(min(config.backoff_s * 2**attempt, config.backoff_max_s))
    raise DownloadError(f"{url}: failed after {config.retries + 1} attempts: {last}") from last


def _link_or_use(src: Path, dest: Path) -> Path:
    """Hard-link `src` to `dest` (same filesystem); otherwise use `src` in place (no copy)."""
    if dest.exists() and dest.samefile(src):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.link")
    try:
        os.link(src, tmp)
    except OSError:
        return src
    os.replace(tmp, dest)
    return dest


def fetch_archive(
    archive: Archive,
    download_dir: Path,
    *,
    archives_dir: Path | None = None,
    lock: LockFile | None = None,
    config: DownloadConfig | None = None,
) -> tuple[Path, str]:
    """Return (path, sha256) of a verified copy of `archive`.

    With `archives_dir` the file must already be there (`archives_dir/<filename>`); it is
    verified in place (a bad one is reported, not renamed: the folder may be read-only)
    and hard-linked into `download_dir` when possible. The network is never touched.
    Otherwise an existing verified file in `download_dir` is reused, else it is downloaded.
    """
    config = config or DownloadConfig()
    download_dir = Path(download_dir)
    final = download_dir / archive.filename
    if archives_dir is not None:
        src = Path(archives_dir) / archive.filename
        if not src.is_file():
            raise DownloadError(
                f"{src}: archive '{archive.name}' not found in --from-dir {archives_dir} "
                "(no network used)"
            )
        sha = verify_file(src, archive, lock, quarantine=False)
        return _link_or_use(src, final), sha
    if final.is_file():
        return final, verify_file(final, archive, lock)
    download_dir.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    errors = []
    for url in archive.urls:
        try:
            http_download(url, part, config, desc=archive.filename)
            break
        except DownloadError as e:
            errors.append(str(e))
    else:
        raise DownloadError(f"{archive.name}: no URL worked: " + " | ".join(errors))
    sha = verify_file(part, archive, lock)  # a bad .part becomes .part.bad
    os.replace(part, final)
    return final, sha
