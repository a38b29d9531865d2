import json

import numpy as np
import pytest
import torch

from bbam.data.coco import read_coco
from bbam.data.synthetic import SyntheticConfig, generate_synthetic
from bbam.manifest import write_part
from bench import pseudo_labels as bench

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    generate_synthetic(root, SyntheticConfig(num_train=0, num_val=3, image_size=(64, 96), seed=3))
    ann = root / "annotations" / "instances_val.json"
    images = root / "VOC2012" / "JPEGImages"
    return ann, images, read_coco(ann, images, with_masks=True)


def _coarse(mask: np.ndarray, factor: int = 4) -> np.ndarray:
    h, w = mask.shape
    return mask.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def test_evaluate_with_perfect_and_empty_maps(synthetic):
    _, _, dataset = synthetic
    records = dataset.records
    perfect = {
        bench.map_key(r.image_id, i.instance_id): i.mask.astype(np.float32)
        for r in records
        for i in r.instances
    }
    out = bench.evaluate_pseudo_labels(records, perfect, num_classes=len(dataset.classes))
    n = sum(len(r.instances) for r in records)
    assert out["n_instances"] == n and out["n_missing_map"] == 0
    assert out["miou_bbam_raw"] == pytest.approx(100.0)
    for v in bench.VARIANTS:
        assert 0.0 <= out[f"miou_{v}"] <= 100.0
    assert out["miou_bbam_raw"] > out["miou_box"]
    # the refinement ceiling feeds the GT mask as the map: here the same input as bbam_crf
    assert out["miou_gt_map_crf"] == out["miou_bbam_crf"]
    empty = bench.evaluate_pseudo_labels(records, {}, num_classes=len(dataset.classes))
    assert empty["miou_gt_map_crf"] == out["miou_gt_map_crf"]  # whatever the maps
    assert empty["n_missing_map"] == n
    assert empty["fallbacks"].get("empty_map") == n
    assert empty["miou_bbam_raw"] < out["miou_bbam_raw"]
    assert out["n_explained"] == n and empty["n_explained"] == 0
    assert out["miou_bbam_raw_explained"] == pytest.approx(out["miou_bbam_raw"])
    assert empty["miou_bbam_crf_explained"] is None


def test_explained_subset_counts_only_instances_with_map_mass(synthetic):
    _, _, dataset = synthetic
    records = dataset.records
    keys = [(r, i) for r in records for i in r.instances]
    half = {
        bench.map_key(r.image_id, i.instance_id): i.mask.astype(np.float32) for r, i in keys[::2]
    }
    zero = next(iter(keys[1::2]), None)
    if zero is not None:  # an all-zero map (no_positive) is not an explained instance
        r, i = zero
        half[bench.map_key(r.image_id, i.instance_id)] = np.zeros(i.mask.shape, np.float32)
    out = bench.evaluate_pseudo_labels(records, half, num_classes=len(dataset.classes))
    assert out["n_explained"] == len(keys[::2])
    assert out["miou_bbam_raw_explained"] == pytest.approx(100.0)
    if zero is not None:
        assert out["miou_bbam_raw"] < out["miou_bbam_raw_explained"]


def test_main_reads_manifest_maps_and_merges_results(synthetic, tmp_path):
    ann, images, dataset = synthetic
    rows, grids = [], []
    for r in dataset.records:
        for inst in r.instances:
            rows.append(
                {
                    "key": bench.map_key(r.image_id, inst.instance_id),
                    "image_id": r.image_id,
                    "instance_id": int(inst.instance_id),
                    "status": "ok",
                    "resized_h": r.height,
                    "resized_w": r.width,
                    "image_h": r.height,
                    "image_w": r.width,
                }
            )
            grids.append(_coarse(inst.mask))
    write_part(tmp_path / "maps" / "shard-000", rows, grids)
    maps = bench.load_maps(tmp_path / "maps")
    assert len(maps) == len(rows)
    first = maps[rows[0]["key"]]
    assert first.shape == (dataset.records[0].height, dataset.records[0].width)
    assert first.dtype == np.float32

    results = tmp_path / "results.json"
    results.write_text(json.dumps({"detector": {"ap50": 1.0}}))
    argv = [
        "--annotations",
        str(ann),
        "--image-root",
        str(images),
        "--maps",
        str(tmp_path / "maps"),
    ]
    assert bench.main(argv + ["--results", str(results)]) == 0
    data = json.loads(results.read_text())
    assert data["detector"] == {"ap50": 1.0}
    entry = data["pseudo_labels"]
    for v in bench.VARIANTS:
        assert 0.0 <= entry[f"miou_{v}"] <= 100.0
    assert entry["miou_bbam_raw"] > entry["miou_box"]
    assert entry["n_instances"] == len(rows)
    assert entry["refine_config"] == "reference defaults"

    params = tmp_path / "params.yaml"
    params.write_text("refine:\n  crf: false\nproposals:\n  enabled: false\n")
    assert bench.main(argv + ["--results", str(results), "--params", str(params)]) == 0
    entry = json.loads(results.read_text())["pseudo_labels"]
    assert entry["refine_config"] == "params"
    assert entry["n_mcg_used"] == 0  # proposals disabled by the params file
