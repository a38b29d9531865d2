import io
import json
import os
import stat
import tarfile
import zipfile

import pytest
from helpers.archive_server import tar_bytes, zip_bytes

import bbam.data.extract as extract_mod
from bbam.data.extract import MARKER, UnsafeArchiveError, extract_archive, extraction_done
from bbam.data.records import DataError

MEMBERS = {"top/a.txt": b"alpha", "top/sub/b.bin": os.urandom(3000), "top/c.txt": b"gamma"}


def _tar(path, entries, mode="w"):
    """entries: list of (TarInfo kwargs, data or None)."""
    with tarfile.open(path, mode) as tf:
        for kw, data in entries:
            info = tarfile.TarInfo(kw.pop("name"))
            for k, v in kw.items():
                setattr(info, k, v)
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name, data=b"x"):
    return ({"name": name}, data)


def _assert_clean(tmp_path, target):
    """Nothing half-done: no target, no temp folder, nothing written next to the workspace."""
    assert not target.exists()
    assert not [p for p in target.parent.iterdir() if ".extracting" in p.name]
    assert not list(tmp_path.parent.glob("evil*")) and not list(tmp_path.rglob("evil*"))


@pytest.mark.parametrize("kind", ["w", "w:gz", "w:bz2", "w:xz", "zip"])
def test_extracts_all_formats_with_marker(tmp_path, kind):
    src = tmp_path / "arch"
    src.write_bytes(zip_bytes(MEMBERS) if kind == "zip" else tar_bytes(MEMBERS, kind))
    target = tmp_path / "out"
    assert extract_archive(src, target, "abc", name="fixture") == target
    for name, data in MEMBERS.items():
        assert (target / name).read_bytes() == data
    marker = json.loads((target / MARKER).read_text())
    assert marker["sha256"] == "abc" and marker["members"] == len(MEMBERS)
    assert extraction_done(target, "abc") and not extraction_done(target, "other")


def test_rerun_with_same_sum_skips_and_new_sum_reextracts(tmp_path, monkeypatch):
    src = tmp_path / "a.tgz"
    src.write_bytes(tar_bytes(MEMBERS))
    target = extract_archive(src, tmp_path / "out", "s1")
    (target / "top" / "a.txt").write_bytes(b"edited")
    calls = []
    real = extract_mod._extract_tar
    monkeypatch.setattr(extract_mod, "_extract_tar", lambda *a: calls.append(a) or real(*a))
    extract_archive(src, target, "s1")
    assert calls == [] and (target / "top" / "a.txt").read_bytes() == b"edited"
    extract_archive(src, target, "s2")
    assert len(calls) == 1 and (target / "top" / "a.txt").read_bytes() == b"alpha"


def test_killed_extraction_never_looks_finished(tmp_path, monkeypatch):
    src = tmp_path / "a.tgz"
    src.write_bytes(tar_bytes(MEMBERS))
    target = tmp_path / "out"
    real, written = extract_mod._write_stream, []

    def dying(fobj, dest, mode):
        if written:
            raise KeyboardInterrupt  # killed after the first file
        written.append(dest)
        real(fobj, dest, mode)

    monkeypatch.setattr(extract_mod, "_write_stream", dying)
    with pytest.raises(KeyboardInterrupt):
        extract_archive(src, target, "s")
    assert written and not target.exists()
    assert not [p for p in tmp_path.iterdir() if ".extracting" in p.name]
    monkeypatch.setattr(extract_mod, "_write_stream", real)
    extract_archive(src, target, "s")
    assert extraction_done(target, "s")


@pytest.mark.parametrize(
    "entries",
    [
        pytest.param([_file("ok.txt"), _file("../evil.txt")], id="dotdot"),
        pytest.param([_file("a/../../evil.txt")], id="nested-dotdot"),
        pytest.param([_file("/tmp/evil_abs.txt")], id="absolute"),
        pytest.param(
            [({"name": "lnk", "type": tarfile.SYMTYPE, "linkname": "../.."}, None)], id="symlink-up"
        ),
        pytest.param(
            [({"name": "lnk", "type": tarfile.SYMTYPE, "linkname": "/etc"}, None)],
            id="symlink-absolute",
        ),
        pytest.param(
            [
                ({"name": "s", "type": tarfile.SYMTYPE, "linkname": "."}, None),
                ({"name": "p", "type": tarfile.SYMTYPE, "linkname": "s/.."}, None),
                _file("p/evil.txt"),
            ],
            id="symlink-chain",
        ),
        pytest.param(  # each fine when written; b -> . then makes a -> b/b/../.. = ../..
            [
                ({"name": "a", "type": tarfile.SYMTYPE, "linkname": "b/b/../.."}, None),
                ({"name": "b", "type": tarfile.SYMTYPE, "linkname": "."}, None),
                _file("ok.txt"),
            ],
            id="symlink-redirected-later",
        ),
        pytest.param(
            [({"name": "h", "type": tarfile.LNKTYPE, "linkname": "../evil_target"}, None)],
            id="hardlink-up",
        ),
        pytest.param([({"name": "fifo", "type": tarfile.FIFOTYPE}, None)], id="fifo"),
        pytest.param(
            [({"name": "dev", "type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}, None)],
            id="chardev",
        ),
    ],
)
def test_unsafe_tar_members_are_refused(tmp_path, entries):
    work = tmp_path / "work"
    work.mkdir()
    src = _tar(tmp_path / "bad.tar", [(dict(kw), data) for kw, data in entries])
    target = work / "out"
    with pytest.raises(UnsafeArchiveError):
        extract_archive(src, target, "s")
    _assert_clean(work, target)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "evil_target").exists()


def test_symlink_escape_then_write_through_it_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    src = _tar(
        tmp_path / "bad.tar",
        [
            ({"name": "d", "type": tarfile.SYMTYPE, "linkname": "../../outside"}, None),
            _file("d/evil.txt"),
        ],
    )
    with pytest.raises(UnsafeArchiveError, match="outside"):
        extract_archive(src, work / "out", "s")
    assert list(outside.iterdir()) == []
    _assert_clean(work, work / "out")


def test_safe_links_inside_are_kept(tmp_path):
    src = _tar(
        tmp_path / "ok.tar",
        [
            _file("dir/real.txt", b"data"),
            ({"name": "dir/sym", "type": tarfile.SYMTYPE, "linkname": "real.txt"}, None),
            ({"name": "hard", "type": tarfile.LNKTYPE, "linkname": "dir/real.txt"}, None),
        ],
    )
    target = extract_archive(src, tmp_path / "out", "s")
    assert (target / "dir" / "sym").is_symlink() and (
        target / "dir" / "sym"
    ).read_bytes() == b"data"
    assert (target / "hard").read_bytes() == b"data"


def test_zip_traversal_and_symlink_escape_are_refused(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    bad = tmp_path / "bad.zip"
    bad.write_bytes(zip_bytes({"ok.txt": b"1", "../evil.txt": b"2"}))
    with pytest.raises(UnsafeArchiveError, match=r"\.\."):
        extract_archive(bad, work / "out", "s")
    _assert_clean(work, work / "out")

    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("esc")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "../../outside")
        zf.writestr("esc/evil.txt", b"x")
    with pytest.raises(UnsafeArchiveError, match="outside"):
        extract_archive(link, work / "out", "s")
    _assert_clean(work, work / "out")


@pytest.mark.parametrize("kind", ["w:gz", "w:bz2", "w:xz"])
def test_damaged_compressed_archive_is_refused(tmp_path, kind):
    """tarfile never read the gzip trailer, so a flipped bit in a stored deflate block (random
    data: MCG proposals) extracted silently; bz2's damage escaped as a bare OSError."""
    members = {f"MCG/{i}.mat": os.urandom(400_000) for i in range(3)}
    raw = bytearray(tar_bytes(members, kind))
    raw[len(raw) * 3 // 4] ^= 0x10  # past bz2's first 900 kB block: the header still reads
    src = tmp_path / "mcg.tgz"
    src.write_bytes(bytes(raw))
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(DataError, match=r"mcg\.tgz: damaged archive"):
        extract_archive(src, work / "out", "s")
    _assert_clean(work, work / "out")


def test_not_an_archive_is_a_clear_error(tmp_path):
    src = tmp_path / "junk.tar"
    src.write_bytes(b"this is not an archive")
    with pytest.raises(ValueError, match="junk.tar"):
        extract_archive(src, tmp_path / "out", "s")
    assert not (tmp_path / "out").exists()
