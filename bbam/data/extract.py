"""Safe, restartable extraction of tar (plain/gz/bz2/xz) and zip archives.

Every member is checked before anything is written for it: absolute paths, `..`
components, links leading outside the target, and device files/fifos are refused
(UnsafeArchiveError) and the whole extraction is abandoned. Members are written into a
temporary folder next to the target, which is renamed into place only when complete, so a
killed extraction never looks finished. A marker file in the target records the archive's
sha256; a re-run with the same sha256 skips the work, a different one re-extracts.
"""

from __future__ import annotations

import json
import lzma
import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path

from bbam.data.records import DataError

MARKER = ".bbam_extracted.json"


class UnsafeArchiveError(DataError):
    """An archive member would escape the target or is not a plain file/dir/safe link."""


def extraction_done(target: Path, sha256: str) -> bool:
    """True when `target` holds a finished extraction of the archive with this sha256."""
    marker = Path(target) / MARKER
    try:
        return json.loads(marker.read_text()).get("sha256") == sha256
    except (OSError, ValueError, AttributeError):
        return False


def _safe_relpath(name: str, archive: Path) -> str:
    """Normalise a member name to a relative posix path, refusing absolute paths and `..`."""
    unix = name.replace("\\", "/")
    if unix.startswith("/") or (len(unix) > 1 and unix[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member '{name}' has an absolute path")
    parts = [p for p in unix.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member '{name}' contains '..'")
    return "/".join(parts)


def _check_link(rel: str, link: str, archive: Path, *, hard: bool) -> str:
    """Return the link target relative to the root; refuse ones leaving it."""
    if link.startswith("/") or link.replace("\\", "/").startswith("/"):
        raise UnsafeArchiveError(f"{archive}: link '{rel}' -> '{link}' is absolute")
    base = "" if hard else posixpath.dirname(rel)
    resolved = posixpath.normpath(posixpath.join(base, link.replace("\\", "/")))
    if resolved == ".." or resolved.startswith("../"):
        raise UnsafeArchiveError(f"{archive}: link '{rel}' -> '{link}' points outside the target")
    return resolved


def _check_inside(root: Path, p: str | Path, archive: Path, rel: str) -> None:
    """Refuse `p` unless its real path (existing links resolved) lies under `root`."""
    real_root = os.path.realpath(root)
    if os.path.commonpath([os.path.realpath(p), real_root]) != real_root:
        raise UnsafeArchiveError(f"{archive}: member '{rel}' would be written outside the target")


def _dest(root: Path, rel: str, archive: Path) -> Path:
    """Destination path, checked after resolving links already extracted (symlink chains)."""
    dest = root / rel
    _check_inside(root, dest.parent, archive, rel)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        dest.unlink()
    return dest


def _mkdir(root: Path, rel: str, archive: Path) -> None:
    _check_inside(root, root / rel, archive, rel)
    (root / rel).mkdir(parents=True, exist_ok=True)


def _symlink(root: Path, rel: str, link: str, archive: Path) -> None:
    _check_link(rel, link, archive, hard=False)
    dest = _dest(root, rel, archive)
    os.symlink(link, dest)
    real_root = os.path.realpath(root)
    if os.path.commonpath([os.path.realpath(dest), real_root]) != real_root:
        dest.unlink()
        raise UnsafeArchiveError(f"{archive}: link '{rel}' -> '{link}' resolves outside the target")


def _write_stream(src, dest: Path, mode: int | None) -> None:
    with open(dest, "wb") as f:
        shutil.copyfileobj(src, f, 1 << 20)
    if mode is not None:
        os.chmod(dest, (mode & 0o755) | 0o600)


def _extract_tar(path: Path, root: Path) -> int:
    n = 0
    with tarfile.open(path, "r:*") as tf:
        for m in tf:  # streamed: members are checked one by one before being written
            if m.ischr() or m.isblk() or m.isfifo() or m.isdev():
                raise UnsafeArchiveError(f"{path}: member '{m.name}' is a device file or fifo")
            if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                raise UnsafeArchiveError(f"{path}: member '{m.name}' has unsupported type")
            rel = _safe_relpath(m.name, path)
            if not rel:
                continue
            if m.isdir():
                _mkdir(root, rel, path)
            elif m.issym():
                _symlink(root, rel, m.linkname, path)
            elif m.islnk():
                target_rel = _check_link(rel, m.linkname, path, hard=True)
                src = root / target_rel
                _check_inside(root, src, path, rel)
                if not src.is_file():
                    raise UnsafeArchiveError(f"{path}: hard link '{rel}' to missing '{target_rel}'")
                shutil.copyfile(src, _dest(root, rel, path))
            else:
                fobj = tf.extractfile(m)
                if fobj is None:
                    raise UnsafeArchiveError(f"{path}: member '{m.name}' has no data")
                with fobj:
                    _write_stream(fobj, _dest(root, rel, path), m.mode)
            n += 1
        # tarfile stops at the end-of-archive blocks and never reads the gzip/bz2/xz trailer,
        # so a damaged body would extract silently: reading to EOF makes the CRC be checked.
        while tf.fileobj.read(1 << 20):
            pass
    return n


def _extract_zip(path: Path, root: Path) -> int:
    n = 0
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            rel = _safe_relpath(info.filename, path)
            mode = info.external_attr >> 16
            if not rel:
                continue
            kind = stat.S_IFMT(mode)
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
                raise UnsafeArchiveError(f"{path}: member '{info.filename}' is a special file")
            if info.is_dir():
                _mkdir(root, rel, path)
            elif kind == stat.S_IFLNK:
                link = zf.read(info).decode("utf-8")
                _symlink(root, rel, link, path)
            else:
                with zf.open(info) as src:
                    _write_stream(src, _dest(root, rel, path), mode or None)
            n += 1
    return n


def _check_links(root: Path, archive: Path) -> None:
    """Refuse links that resolve outside `root` once all are written: each is checked when
    written, but a later one can redirect an earlier one (a -> b/b/../.., then b -> .)."""
    real_root = os.path.realpath(root)
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            link = os.path.join(folder, name)
            if not os.path.islink(link):
                continue
            if os.path.commonpath([os.path.realpath(link), real_root]) != real_root:
                rel = os.path.relpath(link, root)
                raise UnsafeArchiveError(
                    f"{archive}: link '{rel}' -> '{os.readlink(link)}' resolves outside the target"
                )


def extract_archive(path: Path, target: Path, sha256: str, *, name: str = "") -> Path:
    """Extract `path` into `target` safely and atomically; skip when already done.

    `target` is owned by this function: an existing one without a matching marker (an
    older archive, or someone's partial copy) is replaced.
    """
    path, target = Path(path), Path(target)
    if extraction_done(target, sha256):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.extracting-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        try:
            if tarfile.is_tarfile(path):
                count = _extract_tar(path, tmp)
            elif zipfile.is_zipfile(path):
                count = _extract_zip(path, tmp)
            else:
                raise DataError(f"{path}: not a tar or zip archive")
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError) as exc:
            # A header that reads but a body cut short (or corrupt): the file, not the disk.
            raise DataError(f"{path}: damaged archive ({type(exc).__name__}: {exc})") from exc
        except OSError as exc:
            # gzip's CRC/length check (BadGzipFile) and bz2's "Invalid data stream" are
            # OSErrors without an errno; a disk error (ENOSPC, EIO) has one and stays as it is.
            if exc.errno is not None:
                raise
            raise DataError(f"{path}: damaged archive ({type(exc).__name__}: {exc})") from exc
        _check_links(tmp, path)
        marker = {"archive": name or path.name, "sha256": sha256, "members": count}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
