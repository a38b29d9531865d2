import json
import os
import urllib.request

import pytest
from helpers.archive_server import ArchiveServer, local_only_urlopen, sha256

from bbam.data.download import (
    ARCHIVES,
    Archive,
    ChecksumError,
    DownloadConfig,
    DownloadError,
    LockFile,
    fetch_archive,
    http_download,
)

FAST = DownloadConfig(retries=3, backoff_s=0.0, timeout_s=10.0, chunk_bytes=1000, progress=False)
PAYLOAD = os.urandom(50_000)


@pytest.fixture(autouse=True)
def _local_only(monkeypatch):
    local_only_urlopen(monkeypatch)


def archive_for(server: ArchiveServer, name: str, sha: str | None, **kw) -> Archive:
    return Archive(name, (server.url(name),), name, sha, kw.pop("size", None), name, **kw)


def test_full_download_verifies_and_renames(tmp_path):
    with ArchiveServer({"a.tar": PAYLOAD}) as server:
        path, sha = fetch_archive(
            archive_for(server, "a.tar", sha256(PAYLOAD)), tmp_path, config=FAST
        )
    assert path == tmp_path / "a.tar" and path.read_bytes() == PAYLOAD
    assert sha == sha256(PAYLOAD)
    assert not (tmp_path / "a.tar.part").exists()
    assert [e["range"] for e in server.log] == [None]


def test_cut_transfer_resumes_with_range_and_no_resent_bytes(tmp_path):
    cut = 12_345
    with ArchiveServer({"a.tar": PAYLOAD}) as server:
        server.cuts["a.tar"] = [cut]
        path, _ = fetch_archive(
            archive_for(server, "a.tar", sha256(PAYLOAD)), tmp_path, config=FAST
        )
    assert path.read_bytes() == PAYLOAD
    first, second = server.log
    assert first["range"] is None and first["sent"] == cut
    assert second["range"] == f"bytes={cut}-" and second["status"] == 206
    assert second["sent"] == len(PAYLOAD) - cut  # nothing already received was re-sent


def test_server_ignoring_range_restarts_cleanly(tmp_path):
    part = tmp_path / "a.tar.part"
    part.write_bytes(b"x" * 1000)  # stale, wrong prefix: must not survive a 200 answer
    with ArchiveServer({"a.tar": PAYLOAD}) as server:
        server.ignore_range = True
        http_download(server.url("a.tar"), part, FAST)
    assert server.log[0]["range"] == "bytes=1000-" and server.log[0]["status"] == 200
    assert part.read_bytes() == PAYLOAD


def test_part_longer_than_file_restarts(tmp_path):
    part = tmp_path / "a.tar.part"
    part.write_bytes(b"y" * (len(PAYLOAD) + 10))
    with ArchiveServer({"a.tar": PAYLOAD}) as server:
        http_download(server.url("a.tar"), part, FAST)
    assert [e["status"] for e in server.log] == [416, 200]
    assert part.read_bytes() == PAYLOAD


def test_wrong_checksum_is_refused_and_kept_as_bad(tmp_path):
    wrong = "0" * 64
    with ArchiveServer({"a.tar": PAYLOAD}) as server:
        with pytest.raises(ChecksumError) as info:
            fetch_archive(archive_for(server, "a.tar", wrong), tmp_path, config=FAST)
    msg = str(info.value)
    assert wrong in msg and sha256(PAYLOAD) in msg and "sha256" in msg
    assert not (tmp_path / "a.tar").exists() and not (tmp_path / "a.tar.part").exists()
    assert (tmp_path / "a.tar.bad").read_bytes() == PAYLOAD


def test_md5_and_size_are_checked(tmp_path):
    with ArchiveServer({"a.tar": PAYLOAD}) as server:
        with pytest.raises(ChecksumError, match="md5"):
            fetch_archive(archive_for(server, "a.tar", None, md5="f" * 32), tmp_path, config=FAST)
        with pytest.raises(ChecksumError, match="size"):
            fetch_archive(archive_for(server, "a.tar", None, size=7), tmp_path, config=FAST)


def test_unknown_sum_is_locked_on_first_download_and_enforced_after(tmp_path):
    lock_path = tmp_path / "downloads.lock.json"
    with ArchiveServer({"a.tar": PAYLOAD}) as server:
        archive = archive_for(server, "a.tar", None)
        fetch_archive(archive, tmp_path / "dl", lock=LockFile.load(lock_path), config=FAST)
        locked = json.loads(lock_path.read_text())["archives"]["a.tar"]
        assert locked == {"filename": "a.tar", "sha256": sha256(PAYLOAD), "size": len(PAYLOAD)}
        # The server now serves different bytes: the lock must refuse them.
        (tmp_path / "dl" / "a.tar").unlink()
        server.files["a.tar"] = PAYLOAD[::-1]
        with pytest.raises(ChecksumError, match=sha256(PAYLOAD)):
            fetch_archive(archive, tmp_path / "dl", lock=LockFile.load(lock_path), config=FAST)
    assert not list(lock_path.parent.glob(".*.tmp"))


def test_existing_file_is_reverified_without_network(tmp_path, monkeypatch):
    (tmp_path / "a.tar").write_bytes(PAYLOAD)
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    archive = Archive("a", ("http://127.0.0.1:9/a.tar",), "a.tar", sha256(PAYLOAD), None, "a")
    assert fetch_archive(archive, tmp_path, config=FAST)[1] == sha256(PAYLOAD)
    (tmp_path / "a.tar").write_bytes(PAYLOAD + b"!")
    with pytest.raises(ChecksumError):
        fetch_archive(archive, tmp_path, config=FAST)


def _no_network(*args, **kwargs):
    raise AssertionError("network used")


def test_from_dir_never_touches_network(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    src = tmp_path / "archives"
    src.mkdir()
    (src / "a.tar").write_bytes(PAYLOAD)
    archive = Archive("a", ("http://127.0.0.1:9/a.tar",), "a.tar", None, None, "a")
    lock = LockFile.load(tmp_path / "lock.json")
    path, sha = fetch_archive(archive, tmp_path / "dl", archives_dir=src, lock=lock, config=FAST)
    assert path.read_bytes() == PAYLOAD and sha == sha256(PAYLOAD)
    missing = Archive("b", ("http://127.0.0.1:9/b.tar",), "b.tar", None, None, "b")
    with pytest.raises(DownloadError, match="no network"):
        fetch_archive(missing, tmp_path / "dl", archives_dir=src, lock=lock, config=FAST)
    # A bad file in the user's folder is reported but left where it is.
    (src / "c.tar").write_bytes(b"corrupt")
    bad = Archive("c", ("http://127.0.0.1:9/c.tar",), "c.tar", "1" * 64, None, "c")
    with pytest.raises(ChecksumError):
        fetch_archive(bad, tmp_path / "dl", archives_dir=src, lock=lock, config=FAST)
    assert (src / "c.tar").read_bytes() == b"corrupt"


def test_missing_file_fails_without_retrying(tmp_path):
    with ArchiveServer({}) as server:
        with pytest.raises(DownloadError, match="404"):
            fetch_archive(archive_for(server, "a.tar", None), tmp_path, config=FAST)
    assert len(server.log) == 1


def test_gives_up_after_configured_retries(tmp_path):
    with ArchiveServer({"a.tar": PAYLOAD}) as server:
        server.cuts["a.tar"] = [100] * 10
        with pytest.raises(DownloadError, match="4 attempts"):
            fetch_archive(archive_for(server, "a.tar", None), tmp_path, config=FAST)
    assert len(server.log) == FAST.retries + 1
    assert [e["range"] for e in server.log[1:]] == [f"bytes={100 * i}-" for i in range(1, 4)]
    assert not (tmp_path / "a.tar").exists()


def test_registry_covers_the_paper_archives():
    names = {a.filename for a in ARCHIVES.values()}
    assert {"VOCtrainval_11-May-2012.tar", "benchmark.tgz", "train2017.zip", "val2017.zip"} <= names
    assert ARCHIVES["voc2012_trainval"].md5 == "6cd6e144f989b92b3379bac3b3de84fd"
    for a in ARCHIVES.values():
        assert a.urls and all(u.startswith(("http://", "https://")) for u in a.urls)
        assert a.sha256 is None or len(a.sha256) == 64
