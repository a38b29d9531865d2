"""The prepare_data stage's tasks on fixture archives, with the real-data params files.

The tasks' ``.fn`` run in the order the flow calls them (no Prefect engine: fast), in a
temporary working directory, so the relative paths of configs/voc.yaml and configs/coco.yaml
are used exactly as written. Archives come from ``data.archives_dir``; the network is never
touched.
"""

import json
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers.archive_server import (
    COCO_CATEGORIES,
    COCO_IMAGES,
    TRAIN_AUG,
    VOC_IMAGES,
    VOC_SEG,
    box_masks,
    coco_zips,
    mcg_tgz,
    sbd_tgz,
    voc_tar,
)

import bbam.data.prepare as prepare_module
from bbam.data.coco import read_coco
from bbam.data.download import ARCHIVES, DATASET_ARCHIVES
from bbam.data.palette import load_index_png
from bbam.data.records import DataError
from bbam.data.voc import VOC_CLASSES
from bbam.data.writers import PREPARED_FORMAT, VOID_KEY
from bbam.segmenters.targets import render_label_map
from tasks.prepare_data import conversion_stamp, prepare, summarise, voc_to_coco

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _no_network(*args, **kwargs):
    raise AssertionError("network used")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    # The fixture archives are not the real ones: keep names and layout, drop the public md5s.
    fixture_registry = {
        name: type(a)(a.name, a.urls, a.filename, None, None, a.extract_to)
        for name, a in ARCHIVES.items()
    }
    monkeypatch.setattr(prepare_module, "ARCHIVES", fixture_registry)


def write_archives(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def voc_archives(folder: Path) -> Path:
    return write_archives(
        folder,
        {
            ARCHIVES["voc2012_trainval"].filename: voc_tar(),
            ARCHIVES["sbd"].filename: sbd_tgz(),
            ARCHIVES["mcg_voc2012"].filename: mcg_tgz("MCG-Pascal-Main", list(VOC_IMAGES)[1:]),
            ARCHIVES["mcg_voc2012_segmentation"].filename: mcg_tgz(
                "MCG-Pascal-Segmentation", list(VOC_IMAGES)[:2]
            ),
        },
    )


def params_file(tmp_path: Path, config: str, archives: Path, **data) -> str:
    """configs/<config> with data.archives_dir set (and any other data keys), in tmp_path."""
    params = yaml.safe_load((CONFIGS / config).read_text())
    params["data"].update(archives_dir=str(archives), **data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


def run_prepare_stage(params_path: str) -> dict:
    """What flows.prepare_data.prepare_data does, task by task."""
    params = yaml.safe_load(Path(params_path).read_text())
    prepare.fn(params)
    if params["data"]["name"] == "voc":
        voc_to_coco.fn(params)
    return summarise.fn(params)


def test_voc_config_prepares_train_aug_and_val_as_coco(tmp_path, monkeypatch):
    archives = voc_archives(tmp_path / "archives")
    monkeypatch.chdir(tmp_path)
    params_path = params_file(tmp_path, "voc.yaml", archives)
    params = yaml.safe_load(Path(params_path).read_text())

    summary = run_prepare_stage(params_path)

    data = params["data"]
    for split, ids in (("train", TRAIN_AUG), ("val", VOC_SEG["val"])):
        ds = read_coco(data[f"{split}_json"], data[f"{split}_images"])
        assert ds.classes == list(VOC_CLASSES)
        assert [r.image_id for r in ds.records] == ids
        for record in ds.records:
            assert record.path.is_file()
            assert record.path.parent == Path(data[f"{split}_images"])
            objects = VOC_IMAGES[record.image_id]
            assert len(record.instances) == len(objects)
            inst_map, _ = box_masks(record.image_id)
            for k, (instance, (name, box)) in enumerate(
                zip(record.instances, objects, strict=True), start=1
            ):
                assert ds.classes[instance.label - 1] == name
                np.testing.assert_allclose(instance.box, box)
                np.testing.assert_array_equal(instance.mask, inst_map == k)
        want = Counter(name for i in ids for name, _ in VOC_IMAGES[i])
        got = summary[split]
        assert got["images"] == len(ids) and got["instances"] == sum(want.values())
        assert {k: v for k, v in got["instances_per_class"].items() if v} == dict(want)
    # The MCG folder the refine stage reads is where the config points.
    mcg = sorted(p.stem for p in Path(params["proposals"]["mcg_dir"]).glob("*.mat"))
    assert mcg == sorted(VOC_IMAGES)
    # Category ids are the VOC indices 1..20.
    coco = json.loads(Path(data["train_json"]).read_text())
    assert [c["id"] for c in coco["categories"]] == list(range(1, 21))


def test_voc_to_coco_keeps_existing_json_and_rejects_wrong_image_folder(tmp_path, monkeypatch):
    archives = voc_archives(tmp_path / "archives")
    monkeypatch.chdir(tmp_path)
    params_path = params_file(tmp_path, "voc.yaml", archives)
    run_prepare_stage(params_path)
    train_json = Path(yaml.safe_load(Path(params_path).read_text())["data"]["train_json"])
    before = train_json.stat().st_mtime_ns
    voc_to_coco.fn(yaml.safe_load(Path(params_path).read_text()))  # already there: not rewritten
    assert train_json.stat().st_mtime_ns == before

    wrong = params_file(
        tmp_path,
        "voc.yaml",
        archives,
        train_json="data/voc/annotations/other.json",
        train_images="data/voc/VOC2012/SegmentationClass",
    )
    with pytest.raises(DataError, match="train_images"):
        voc_to_coco.fn(yaml.safe_load(Path(wrong).read_text()))
    assert not Path("data/voc/annotations/other.json").exists()


def test_prepared_voc_keeps_the_void_band_so_gt_label_maps_are_the_official_ones(
    tmp_path, monkeypatch
):
    """The GT label map of an image with VOC PNGs is its SegmentationClass PNG, 255 band
    included (what the official mIoU scores against); SBD images have no void."""
    archives = voc_archives(tmp_path / "archives")
    monkeypatch.chdir(tmp_path)
    params_path = params_file(tmp_path, "voc.yaml", archives)
    run_prepare_stage(params_path)
    data = yaml.safe_load(Path(params_path).read_text())["data"]
    for split in ("train", "val"):
        with_pngs = 0
        for record in read_coco(data[f"{split}_json"], data[f"{split}_images"]).records:
            png = Path(data["root"]) / "VOC2012" / "SegmentationClass" / f"{record.image_id}.png"
            if not png.is_file():
                assert record.void is None
                continue
            with_pngs += 1
            official = load_index_png(png)
            assert (official == 255).any()
            np.testing.assert_array_equal(render_label_map(record), official)
        assert with_pngs == 1


def test_voc_json_of_an_older_version_is_kept_and_a_changed_stamp_rebuilds(tmp_path, monkeypatch):
    """A JSON without a stamp (an older version's, or hand-made) is kept byte for byte: the
    detector and attribution hashes cover it, so a rewrite would redo their work. A stamp of
    another format or VOC split rebuilds it; a kill mid-rebuild never leaves it stale."""
    archives = voc_archives(tmp_path / "archives")
    monkeypatch.chdir(tmp_path)
    params_path = params_file(tmp_path, "voc.yaml", archives)
    run_prepare_stage(params_path)
    params = yaml.safe_load(Path(params_path).read_text())
    val_json, val_images = Path(params["data"]["val_json"]), params["data"]["val_images"]
    stamp = conversion_stamp(val_json)
    assert json.loads(stamp.read_text())["format"] == PREPARED_FORMAT
    assert voc_to_coco.fn(params) == {"train": "up to date", "val": "up to date"}
    # As an older version left it: no void region, no stamp. It still reads (no void).
    coco = json.loads(val_json.read_text())
    for image in coco["images"]:
        del image[VOID_KEY]
    val_json.write_text(json.dumps(coco))
    legacy = val_json.read_bytes()
    stamp.unlink()
    assert voc_to_coco.fn(params)["val"] == "kept without void"
    assert val_json.read_bytes() == legacy and not stamp.exists()
    assert read_coco(val_json, val_images).records[0].void is None
    # A stamp of another format (or VOC split) rebuilds it, with the void region.
    stamp.write_text(json.dumps({"format": PREPARED_FORMAT - 1}))
    assert voc_to_coco.fn(params)["val"] == "written"
    assert json.loads(stamp.read_text())["format"] == PREPARED_FORMAT
    assert read_coco(val_json, val_images).records[0].void is not None
    # Killed after the new stamp, before the new JSON: the JSON is gone, so it is rebuilt.
    val_json.unlink()
    assert voc_to_coco.fn(params)["val"] == "written"
    assert read_coco(val_json, val_images).records[0].void is not None


def test_missing_archive_fails_without_network(tmp_path, monkeypatch):
    archives = voc_archives(tmp_path / "archives")
    (archives / ARCHIVES["sbd"].filename).unlink()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match="benchmark.tgz"):
        prepare.fn(yaml.safe_load(Path(params_file(tmp_path, "voc.yaml", archives)).read_text()))


def test_coco_config_prepares_and_reads_back(tmp_path, monkeypatch):
    files = coco_zips()
    for role, stems in (
        ("mcg_train", ["COCO_train2014_000000000009"]),
        ("mcg_val", ["COCO_val2014_000000000139", "COCO_val2014_000000000285"]),
    ):
        files[ARCHIVES[DATASET_ARCHIVES["coco"][role]].filename] = mcg_tgz("MCG", stems)
    archives = write_archives(tmp_path / "archives", files)
    monkeypatch.chdir(tmp_path)
    params_path = params_file(tmp_path, "coco.yaml", archives)
    params = yaml.safe_load(Path(params_path).read_text())

    summary = run_prepare_stage(params_path)

    names = {c["id"]: c["name"] for c in COCO_CATEGORIES}
    for split, coco_split in (("train", "train2017"), ("val", "val2017")):
        ds = read_coco(params["data"][f"{split}_json"], params["data"][f"{split}_images"])
        assert ds.classes == [names[i] for i in sorted(names)]
        images = COCO_IMAGES[coco_split]
        assert sorted(r.image_id for r in ds.records) == sorted(f"{i:012d}" for i in images)
        for record in ds.records:
            assert record.path.is_file()
            objects = images[int(record.image_id)]
            for instance, (cat, (x, y, w, h)) in zip(record.instances, objects, strict=True):
                assert ds.classes[instance.label - 1] == names[cat]
                np.testing.assert_allclose(instance.box, [x, y, x + w, y + h])
        assert summary[split]["images"] == len(images)
    mcg = sorted(p.stem for p in Path(params["proposals"]["mcg_dir"]).glob("*.mat"))
    assert mcg == sorted(f"{i:012d}" for imgs in COCO_IMAGES.values() for i in imgs)
