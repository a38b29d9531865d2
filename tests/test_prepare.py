import json
import urllib.request
from collections import Counter

import numpy as np
import pytest
import scipy.io
from helpers.archive_server import (
    COCO_CATEGORIES,
    COCO_IMAGES,
    SBD_SPLITS,
    TRAIN_AUG,
    VOC_IMAGES,
    VOC_SEG,
    ArchiveServer,
    box_masks,
    coco_zips,
    local_only_urlopen,
    mcg_tgz,
    sbd_tgz,
    sha256,
    voc_tar,
)

from bbam.data.download import ARCHIVES, ChecksumError, DownloadConfig
from bbam.data.prepare import main, mcg_image_id, prepare_dataset, summarize_dataset

FAST = DownloadConfig(retries=2, backoff_s=0.0, timeout_s=10.0, progress=False)
MCG_VOC_FOLDER = "MCG-Pascal-Main_trainvaltest_2012-proposals"
MCG_VOC_SEG_FOLDER = "MCG-Pascal-Segmentation_trainvaltest_2012-proposals"
# As the real archives: Main lacks the segmentation set's 2007_* images (played here by
# 2008_000001), which only Segmentation has; both have 2008_000002 (Main's file is linked).
MCG_VOC_MAIN_IDS = ["2008_000002", "2008_000003", "2008_000004"]
MCG_VOC_SEG_IDS = ["2008_000001", "2008_000002"]
MCG_COCO = {
    "mcg_coco_train2014": ("MCG-COCO-train2014-proposals", ["COCO_train2014_000000000009"]),
    "mcg_coco_val2014": (
        "MCG-COCO-val2014-proposals",
        ["COCO_val2014_000000000139", "COCO_val2014_000000000285"],
    ),
}


@pytest.fixture(autouse=True)
def _local_only(monkeypatch):
    local_only_urlopen(monkeypatch)


def voc_files() -> dict[str, bytes]:
    return {
        ARCHIVES["voc2012_trainval"].filename: voc_tar(),
        ARCHIVES["sbd"].filename: sbd_tgz(),
        ARCHIVES["mcg_voc2012"].filename: mcg_tgz(MCG_VOC_FOLDER, MCG_VOC_MAIN_IDS),
        ARCHIVES["mcg_voc2012_segmentation"].filename: mcg_tgz(MCG_VOC_SEG_FOLDER, MCG_VOC_SEG_IDS),
    }


def coco_files() -> dict[str, bytes]:
    files = coco_zips()
    for name, (folder, stems) in MCG_COCO.items():
        files[ARCHIVES[name].filename] = mcg_tgz(folder, stems)
    return files


def local_registry(server: ArchiveServer | None, names) -> dict:
    """The real registry entries with their URLs pointed at the local server."""
    reg = {}
    for name in names:
        a = ARCHIVES[name]
        url = server.url(a.filename) if server else "http://127.0.0.1:9/unused"
        reg[name] = type(a)(a.name, (url,), a.filename, None, None, a.extract_to)
    return reg


VOC_NAMES = ("voc2012_trainval", "sbd", "mcg_voc2012", "mcg_voc2012_segmentation")
COCO_NAMES = tuple(MCG_COCO) + ("coco_train2017", "coco_val2017", "coco_annotations2017")


def expected_voc_counts(ids) -> dict:
    per = Counter(name for i in ids for name, _ in VOC_IMAGES[i])
    return {"images": len(ids), "instances": sum(per.values()), "per": per}


def test_voc_download_extract_layout_and_summary(tmp_path):
    root, dl = tmp_path / "voc", tmp_path / "downloads"
    with ArchiveServer(voc_files()) as server:
        summary = prepare_dataset(
            "voc", root, None, dl, registry=local_registry(server, VOC_NAMES), download=FAST,
            summary_path=tmp_path / "summary.json",
        )  # fmt: skip
        first_log = list(server.log)
        again = prepare_dataset(
            "voc", root, None, dl, registry=local_registry(server, VOC_NAMES), download=FAST
        )
        assert server.log == first_log  # re-run: nothing fetched, nothing re-extracted
    assert sorted(e["path"] for e in first_log) == sorted(voc_files())
    assert again == summary == json.loads((tmp_path / "summary.json").read_text())
    voc = root / "VOC2012"
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "SegmentationObject"):
        assert (voc / sub).is_dir()
    assert (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split() == VOC_SEG["val"]
    for f in ("cls", "inst", "train.txt", "val.txt"):
        assert (root / "SBD" / f).exists()
    assert sorted(p.stem for p in (root / "MCG").glob("*.mat")) == sorted(VOC_IMAGES)
    # an id in both MCG archives takes Main's file; Segmentation fills what Main lacks
    assert MCG_VOC_FOLDER in str((root / "MCG" / "2008_000002.mat").resolve())
    assert MCG_VOC_SEG_FOLDER in str((root / "MCG" / "2008_000001.mat").resolve())
    mat = scipy.io.loadmat(root / "MCG" / "2008_000003.mat")
    assert mat["superpixels"].shape == (48, 64) and mat["labels"].size == 3
    # Summary numbers from the fixture definition.
    for split, ids in (("train_aug", TRAIN_AUG), ("val", VOC_SEG["val"])):
        want, got = expected_voc_counts(ids), summary["splits"][split]
        assert got["images"] == want["images"] and got["instances"] == want["instances"]
        assert {k: v for k, v in got["instances_per_class"].items() if v} == dict(want["per"])
    lock = json.loads((tmp_path / "downloads.lock.json").read_text())["archives"]
    assert set(lock) == set(VOC_NAMES)


def test_prepared_voc_reads_back_with_masks(tmp_path):
    from bbam.data.voc import VOC_CLASSES, read_voc

    root = tmp_path / "voc"
    with ArchiveServer(voc_files()) as server:
        prepare_dataset(
            "voc", root, None, tmp_path / "dl", registry=local_registry(server, VOC_NAMES),
            download=FAST,
        )  # fmt: skip
    ds = read_voc(root, "train_aug", sbd_root=root / "SBD")
    assert [r.image_id for r in ds.records] == TRAIN_AUG
    for record in ds.records:  # 2008_000001 masks come from VOC PNGs, the others from SBD .mat
        inst, _ = box_masks(record.image_id)
        assert len(record.instances) == len(VOC_IMAGES[record.image_id])
        for k, (instance, (name, box)) in enumerate(
            zip(record.instances, VOC_IMAGES[record.image_id], strict=True), start=1
        ):
            assert VOC_CLASSES[instance.label - 1] == name
            np.testing.assert_allclose(instance.box, box)
            np.testing.assert_array_equal(instance.mask, inst == k)
    assert SBD_SPLITS["val"][0] in (root / "SBD" / "val.txt").read_text()


def test_wrong_checksum_extracts_and_lays_out_nothing(tmp_path):
    root, dl = tmp_path / "voc", tmp_path / "dl"
    with ArchiveServer(voc_files()) as server:
        reg = local_registry(server, VOC_NAMES)
        a = reg["voc2012_trainval"]
        reg["voc2012_trainval"] = type(a)(a.name, a.urls, a.filename, "0" * 64, None, a.extract_to)
        with pytest.raises(ChecksumError, match="0" * 64):
            prepare_dataset("voc", root, None, dl, registry=reg, download=FAST)
    assert not (dl / "extracted").exists() and not (root / "VOC2012").exists()
    assert (dl / "VOCtrainval_11-May-2012.tar.bad").exists()
    assert not (dl / "VOCtrainval_11-May-2012.tar").exists()


def _no_network(*args, **kwargs):
    raise AssertionError("network used")


def test_from_dir_without_network_and_cli(tmp_path, monkeypatch):
    archives = tmp_path / "archives"
    archives.mkdir()
    for name, data in voc_files().items():
        (archives / name).write_bytes(data)
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    summary = prepare_dataset(
        "voc", tmp_path / "voc", archives, tmp_path / "dl",
        registry=local_registry(None, VOC_NAMES), download=FAST,
    )  # fmt: skip
    assert summary["splits"]["train_aug"]["images"] == len(TRAIN_AUG)
    # The CLI with the real registry: every archive comes from --from-dir, only MCG asked for.
    rc = main(
        ["--dataset", "voc", "--root", str(tmp_path / "cli"), "--from-dir", str(archives),
         "--download-dir", str(tmp_path / "dl2"), "--lock", str(tmp_path / "cli.lock.json"),
         "--only", "mcg", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    assert len(list((tmp_path / "cli" / "MCG").glob("*.mat"))) == len(VOC_IMAGES)
    assert not (tmp_path / "cli" / "VOC2012").exists()
    with pytest.raises(ValueError, match=r"--only \['mcgx'\]: not part of voc"):
        prepare_dataset("voc", tmp_path / "v", archives, tmp_path / "dl4", only=["mcgx"])
    # A missing archive is a clean CLI error, still without network.
    rc = main(
        ["--dataset", "coco", "--root", str(tmp_path / "c"), "--from-dir", str(archives),
         "--download-dir", str(tmp_path / "dl3"), "--lock", str(tmp_path / "c.lock"),
         "--no-progress"]
    )  # fmt: skip
    assert rc == 1


def test_coco_layout_mcg_ids_and_summary(tmp_path):
    root = tmp_path / "data"
    with ArchiveServer(coco_files()) as server:
        summary = prepare_dataset(
            "coco", root, None, tmp_path / "dl", registry=local_registry(server, COCO_NAMES),
            download=FAST,
        )  # fmt: skip
    for sub in ("train2017", "val2017", "annotations"):
        assert (root / "coco" / sub).is_dir()
    assert sorted(p.stem for p in (root / "MCG").glob("*.mat")) == sorted(
        f"{i:012d}" for imgs in COCO_IMAGES.values() for i in imgs
    )
    names = {c["id"]: c["name"] for c in COCO_CATEGORIES}
    for split, imgs in COCO_IMAGES.items():
        per = Counter(names[cat] for objs in imgs.values() for cat, _ in objs)
        got = summary["splits"][split]
        assert got["images"] == len(imgs) and got["instances"] == sum(per.values())
        assert {k: v for k, v in got["instances_per_class"].items() if v} == dict(per)


def test_prepared_coco_reads_back(tmp_path):
    coco = pytest.importorskip("bbam.data.coco")
    root = tmp_path / "data"
    with ArchiveServer(coco_files()) as server:
        prepare_dataset(
            "coco", root, None, tmp_path / "dl", registry=local_registry(server, COCO_NAMES),
            download=FAST,
        )  # fmt: skip
    ds = coco.read_coco(root / "coco/annotations/instances_val2017.json", root / "coco/val2017")
    assert sorted(r.image_id for r in ds.records) == ["000000000139", "000000000285"]
    for r in ds.records:
        assert r.path.is_file() and (root / "MCG" / f"{r.image_id}.mat").is_file()
        x, y, w, h = COCO_IMAGES["val2017"][int(r.image_id)][0][1]
        np.testing.assert_allclose(r.instances[0].box, [x, y, x + w, y + h])
    assert summarize_dataset(ds)["images"] == 2


def test_synthetic_is_generated_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    params = {"num_train": 3, "num_val": 2, "image_size": (48, 64)}
    summary = prepare_dataset(
        "synthetic", tmp_path / "syn", None, tmp_path / "dl", synthetic=params
    )
    assert summary["splits"]["train"]["images"] == 3 and summary["splits"]["val"]["images"] == 2
    assert (tmp_path / "syn" / "annotations" / "instances_train.json").is_file()
    n_inst = sum(
        len(json.loads((tmp_path / "syn/annotations" / f"instances_{s}.json").read_text())["annotations"])
        for s in ("train", "val")
    )  # fmt: skip
    assert summary["splits"]["train"]["instances"] + summary["splits"]["val"]["instances"] == n_inst
    stamp = tmp_path / "syn" / ".synthetic_config.json"
    before = stamp.stat().st_mtime_ns
    assert (
        prepare_dataset("synthetic", tmp_path / "syn", None, tmp_path / "dl", synthetic=params)
        == summary
    )
    assert stamp.stat().st_mtime_ns == before  # same config: not regenerated
    with pytest.raises(TypeError):
        prepare_dataset("synthetic", tmp_path / "x", None, tmp_path / "dl", synthetic={"bogus": 1})


def test_mcg_id_mapping_and_refusing_user_data(tmp_path):
    assert mcg_image_id("COCO_val2014_000000000139") == "000000000139"
    assert mcg_image_id("2008_000001") == "2008_000001"
    root = tmp_path / "voc"
    (root / "VOC2012").mkdir(parents=True)  # a real folder: never clobbered
    with ArchiveServer(voc_files()) as server:
        with pytest.raises(ValueError, match="not a link"):
            prepare_dataset(
                "voc", root, None, tmp_path / "dl", registry=local_registry(server, VOC_NAMES),
                download=FAST,
            )  # fmt: skip


def _truncated_tgz() -> bytes:
    """A gzip'd tar whose header reads but whose body is cut short."""
    good = voc_files()[ARCHIVES["mcg_voc2012"].filename]
    return good[: len(good) // 2]


def _unsafe_tgz() -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escape.mat")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    return buf.getvalue()


@pytest.mark.parametrize(
    "bad, error",
    [(_unsafe_tgz, "UnsafeArchiveError"), (_truncated_tgz, "damaged archive")],
    ids=["unsafe member", "truncated"],
)
def test_refused_archive_leaves_no_checksum_for_the_good_one(tmp_path, monkeypatch, bad, error):
    """--from-dir: an archive refused at extraction (unsafe member, truncated: named, no raw
    tarfile traceback) must not lock its sha256: the good archive put in its place is then
    verified afresh, not failed as a mismatch."""
    from bbam.data.records import DataError

    archives = tmp_path / "archives"
    archives.mkdir()
    mcg = archives / ARCHIVES["mcg_voc2012"].filename
    mcg.write_bytes(bad())
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    lock = tmp_path / "downloads.lock.json"
    run = lambda: prepare_dataset(  # noqa: E731
        "voc", tmp_path / "voc", archives, tmp_path / "dl", only=["mcg_voc2012"], lock_path=lock,
        registry=local_registry(None, VOC_NAMES), download=FAST,
    )  # fmt: skip
    with pytest.raises(DataError) as caught:
        run()
    assert error in f"{type(caught.value).__name__}: {caught.value}"
    assert mcg.name in str(caught.value) and "put a good archive in its place" in str(caught.value)
    assert "mcg_voc2012" not in json.loads(lock.read_text())["archives"]
    mcg.unlink()  # a new file, as a user replacing it would (not the same inode rewritten)
    mcg.write_bytes(voc_files()[mcg.name])
    run()
    assert len(list((tmp_path / "voc" / "MCG").glob("*.mat"))) == len(MCG_VOC_MAIN_IDS)


def _unsafe_zip() -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../../escape.mat", b"x")
    return buf.getvalue()


REFUSED_ARCHIVES = {
    "hostile tar path": _unsafe_tgz,
    "hostile zip path": _unsafe_zip,
    "damaged archive": _truncated_tgz,
    "not an archive": lambda: b"<html>a login page, not an archive</html>" * 20,
}


@pytest.mark.parametrize("case", list(REFUSED_ARCHIVES))
def test_refused_download_keeps_no_checksum_and_the_good_one_then_succeeds(tmp_path, case):
    """Downloaded from the (local) server, refused at extraction: no sha256 is locked and the
    refused file is set aside, so the good archive the server then serves is fetched afresh
    and verified, not failed as a sha256 mismatch (issue #18, item 5)."""
    from bbam.data.records import DataError

    name = ARCHIVES["mcg_voc2012"].filename
    good = voc_files()[name]
    lock, dl = tmp_path / "downloads.lock.json", tmp_path / "dl"
    with ArchiveServer({name: REFUSED_ARCHIVES[case]()}) as server:
        run = lambda: prepare_dataset(  # noqa: E731
            "voc", tmp_path / "voc", None, dl, only=["mcg_voc2012"], lock_path=lock,
            registry=local_registry(server, VOC_NAMES), download=FAST,
        )  # fmt: skip
        with pytest.raises(DataError, match="put a good archive in its place") as info:
            run()
        assert name in str(info.value)
        assert "mcg_voc2012" not in json.loads(lock.read_text())["archives"]
        assert (dl / f"{name}.bad").is_file() and not (dl / name).exists()
        server.files[name] = good
        run()
    assert len(list((tmp_path / "voc" / "MCG").glob("*.mat"))) == len(MCG_VOC_MAIN_IDS)
    assert json.loads(lock.read_text())["archives"]["mcg_voc2012"]["sha256"] == sha256(good)


def test_checksum_mismatch_keeps_no_checksum_and_the_good_one_then_succeeds(tmp_path):
    """A download refused for its md5 (the registry's) never locks its sha256."""
    import hashlib

    name = ARCHIVES["mcg_voc2012"].filename
    good = voc_files()[name]
    lock, dl = tmp_path / "downloads.lock.json", tmp_path / "dl"
    with ArchiveServer({name: _unsafe_tgz()}) as server:
        registry = local_registry(server, VOC_NAMES)
        a = registry["mcg_voc2012"]
        md5 = hashlib.md5(good, usedforsecurity=False).hexdigest()
        registry["mcg_voc2012"] = type(a)(
            a.name, a.urls, a.filename, None, None, a.extract_to, md5=md5
        )
        run = lambda: prepare_dataset(  # noqa: E731
            "voc", tmp_path / "voc", None, dl, only=["mcg_voc2012"], lock_path=lock,
            registry=registry, download=FAST,
        )  # fmt: skip
        with pytest.raises(ChecksumError, match="md5 mismatch"):
            run()
        assert not lock.exists() or "mcg_voc2012" not in json.loads(lock.read_text())["archives"]
        server.files[name] = good
        run()
    assert json.loads(lock.read_text())["archives"]["mcg_voc2012"]["sha256"] == sha256(good)
