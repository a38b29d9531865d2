"""Every stage on a custom COCO dataset with messy but legal content: images without
annotations, a 2x3 px box, boxes over the border, crowd RLE, grayscale and RGBA files,
mixed image sizes, a category with no train instances, a val-only class, a degenerate
polygon and a file in a subfolder. Nothing may crash and nothing may be dropped silently.

The stages run directly (``python -m flows.<stage>``), not through DVC, with the same
speed tricks as tests/test_pipeline.py (``lr: 0``, IoU cascade ``[0.0]``, few iterations).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from helpers.project_env import custom_data_params, project_env
from PIL import Image, ImageDraw

from bbam.data.writers import mask_to_rle

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CATEGORIES = [(1, "apple"), (2, "pear"), (5, "fig"), (7, "date")]  # fig: val only; date: never
STAGES = ("prepare_data", "train_detector", "attribute", "pseudo_labels", "train_segmenters")


def _poly(x: float, y: float, w: float, h: float) -> list[float]:
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def _image(path: Path, size: tuple[int, int], mode: str, boxes: list[list[float]]) -> None:
    """A noisy background with a filled rectangle per box (width, height = size)."""
    rng = np.random.default_rng(len(path.name))
    pixels = rng.integers(0, 80, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for i, (x, y, w, h) in enumerate(boxes):
        draw.rectangle([x, y, x + w - 1, y + h - 1], fill=(200, 60 + 60 * i, 40))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.convert(mode).save(path)


def _write_split(root: Path, split: str, images: list[dict]) -> None:
    """images: file_name, size (w, h), mode, anns (category_id, bbox, segmentation?, iscrowd?)."""
    out = {"images": [], "annotations": [], "categories": []}
    out["categories"] = [{"id": i, "name": n, "supercategory": "fruit"} for i, n in CATEGORIES]
    ann_id = 100 if split == "train" else 500
    for image_id, spec in enumerate(images, start=1 if split == "train" else 50):
        width, height = spec["size"]
        _image(
            root / "images" / split / spec["file_name"],
            spec["size"],
            spec["mode"],
            [a["bbox"] for a in spec["anns"] if not a.get("iscrowd")],
        )
        out["images"].append(
            {"id": image_id, "file_name": spec["file_name"], "width": width, "height": height}
        )
        for ann in spec["anns"]:
            ann_id += 1
            x, y, w, h = ann["bbox"]
            out["annotations"].append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": ann["category_id"],
                    "bbox": ann["bbox"],
                    "area": float(w * h),
                    "iscrowd": int(ann.get("iscrowd", 0)),
                    "segmentation": ann.get("segmentation", [_poly(x, y, w, h)]),
                }
            )
    path = root / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))


def _crowd(width: int, height: int, x: int, y: int, w: int, h: int) -> dict:
    mask = np.zeros((height, width), dtype=bool)
    mask[y : y + h, x : x + w] = True
    return {"category_id": 1, "bbox": [x, y, w, h], "iscrowd": 1, "segmentation": mask_to_rle(mask)}


def write_messy_coco(root: Path) -> None:
    train = [
        {  # plain RGB; a pear box overhanging the right and bottom border
            "file_name": "plain.jpg",
            "size": (128, 96),
            "mode": "RGB",
            "anns": [
                {"category_id": 1, "bbox": [10, 12, 40, 36]},
                {
                    "category_id": 2,
                    "bbox": [100, 60, 40, 50],
                    "segmentation": [_poly(100, 60, 28, 36)],
                },
            ],
        },
        {  # grayscale JPEG: a 2x3 px box, a degenerate polygon on a valid box, crowd RLE
            "file_name": "gray.jpg",
            "size": (160, 120),
            "mode": "L",
            "anns": [
                {"category_id": 1, "bbox": [20, 20, 2, 3]},
                {"category_id": 2, "bbox": [60, 30, 50, 40], "segmentation": [[60, 30, 110, 70]]},
                {"category_id": 2, "bbox": [0, 0, 48, 40]},
                _crowd(160, 120, 110, 80, 40, 30),
            ],
        },
        {  # RGBA PNG, box touching the left/top border
            "file_name": "alpha.png",
            "size": (120, 160),
            "mode": "RGBA",
            "anns": [{"category_id": 1, "bbox": [0, 0, 50, 60]}],
        },
        {  # a much larger image
            "file_name": "large.jpg",
            "size": (600, 400),
            "mode": "RGB",
            "anns": [
                {"category_id": 2, "bbox": [200, 100, 220, 180]},
                {"category_id": 1, "bbox": [20, 300, 90, 80]},
            ],
        },
        {
            "file_name": "sub/dir/nested.jpg",
            "size": (128, 96),
            "mode": "RGB",
            "anns": [{"category_id": 1, "bbox": [30, 20, 50, 40]}],
        },
        {"file_name": "empty.jpg", "size": (128, 96), "mode": "RGB", "anns": []},
    ]
    val = [
        {
            "file_name": "v_plain.jpg",
            "size": (128, 96),
            "mode": "RGB",
            "anns": [
                {"category_id": 1, "bbox": [8, 8, 40, 40]},
                {"category_id": 5, "bbox": [70, 30, 50, 50]},  # a class never seen in train
            ],
        },
        {
            "file_name": "v_gray.jpg",
            "size": (160, 120),
            "mode": "L",
            "anns": [
                {"category_id": 2, "bbox": [20, 20, 60, 50]},
                _crowd(160, 120, 100, 70, 50, 40),
            ],
        },
        {"file_name": "v_empty.png", "size": (96, 128), "mode": "RGBA", "anns": []},
        {  # a box without a mask: it cannot be scored on masks
            "file_name": "v_box_only.jpg",
            "size": (128, 96),
            "mode": "RGB",
            "anns": [{"category_id": 2, "bbox": [30, 20, 50, 40], "segmentation": None}],
        },
    ]
    _write_split(root, "train", train)
    _write_split(root, "val", val)


def _run_stage(project: Path, stage: str) -> subprocess.CompletedProcess:
    env = project_env(project)
    env["PYTHONPATH"] = str(REPO)  # the code is not copied: no DVC here
    cmd = [sys.executable, "-m", f"flows.{stage}", "--params", "params.yaml"]
    result = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (
        f"{stage} failed:\n{result.stdout[-3000:]}\n{result.stderr[-4000:]}"
    )
    return result


@pytest.fixture(scope="module")
def messy_run(tmp_path_factory):
    project = tmp_path_factory.mktemp("messy") / "project"
    write_messy_coco(project / "mydata")
    (project / "params.yaml").write_text(
        yaml.safe_dump(
            custom_data_params(num_shards=2, chunk_size=4, iterations=4), sort_keys=False
        )
    )
    outputs = {stage: _run_stage(project, stage) for stage in (*STAGES, "evaluate")}
    return project, outputs


def _train_annotations(project: Path) -> list[dict]:
    return json.loads((project / "mydata/annotations/instances_train.json").read_text())[
        "annotations"
    ]


def test_odd_inputs_are_reported_by_the_data_summary(messy_run):
    project, _ = messy_run
    data = json.loads((project / "metrics/data.json").read_text())
    assert data["train"]["images"] == 6 and data["val"]["images"] == 4  # empty images count
    assert data["train"]["skipped"] == {"degenerate_polygon": 1}
    assert data["train"]["instances_per_class"]["fig"] == 0
    assert data["val"]["instances_per_class"]["fig"] == 1
    assert data["train"]["instances_per_class"]["date"] == 0


def test_every_train_instance_is_in_the_attribution_manifest(messy_run):
    project, _ = messy_run
    anns = _train_annotations(project)
    rows = pq.read_table(project / "runs/attribution/manifest.parquet").to_pylist()
    assert sorted(r["instance_id"] for r in rows) == sorted(a["id"] for a in anns)
    assert {r["status"] for r in rows} <= {"ok", "no_positive", "skipped"}
    crowd = {a["id"] for a in anns if a["iscrowd"]}
    skipped = {r["instance_id"]: r["error"] for r in rows if r["status"] == "skipped"}
    assert skipped.keys() == crowd and all("iscrowd" in e for e in skipped.values())
    summary = json.loads((project / "metrics/attribution.json").read_text())
    assert summary["instances"] == len(anns) and summary["skipped"] == len(crowd)
    assert {r["image_id"] for r in rows} == {"plain", "gray", "alpha", "large", "nested"}


def test_every_non_crowd_instance_gets_a_pseudo_label(messy_run):
    project, _ = messy_run
    anns = _train_annotations(project)
    pseudo = json.loads((project / "runs/pseudo_labels/instances_train.json").read_text())
    assert sorted(a["id"] for a in pseudo["annotations"]) == sorted(
        a["id"] for a in anns if not a["iscrowd"]
    )
    assert len(pseudo["images"]) == 6
    semantic = project / "runs/pseudo_labels/semantic"
    assert {p.stem for p in semantic.glob("*.png")} == {
        "plain", "gray", "alpha", "large", "nested", "empty"
    }  # fmt: skip
    summary = json.loads((project / "metrics/pseudo_labels.json").read_text())
    assert summary["image_errors"] == [] and summary["crowd_regions"] == 1
    rows = pq.read_table(project / "runs/pseudo_labels/manifest.parquet").to_pylist()
    by_id = {r["annotation_id"]: r for r in rows}
    degenerate = next(a["id"] for a in anns if a["segmentation"] == [[60, 30, 110, 70]])
    assert by_id[degenerate]["iou_gt"] is None, "no GT mask: not scored as IoU 0"
    tiny = next(a["id"] for a in anns if a["bbox"] == [20, 20, 2, 3])
    assert by_id[tiny]["fg_area"] > 0
    gray = np.asarray(Image.open(semantic / "gray.png"))
    assert (gray[80:110, 110:150] == 255).all(), "a crowd region is ignore, not background"


def test_segmenters_record_what_they_skip_and_evaluation_runs(messy_run):
    project, outputs = messy_run
    for name in ("instance_full", "semantic_full"):
        events = [
            json.loads(line)
            for line in (project / "runs/segmenters" / name / "train_log.jsonl").open()
        ]
        skipped = [e for e in events if e.get("event") == "skipped"]
        assert skipped and skipped[0]["examples"] == {
            "instance without GT mask (full supervision)": ["gray"]
        }
    evaluation = json.loads((project / "metrics/evaluation.json").read_text())
    assert set(evaluation) >= {"full", "bbam", "pseudo_labels", "table"}
    assert evaluation["pseudo_labels"]["pseudo_sem_images_without_gt_mask"] == 1
    assert evaluation["pseudo_labels"]["pseudo_sem_images"] == 5
    for supervision in ("full", "bbam"):  # the box-only val image is left out and counted
        assert evaluation[supervision]["val_images_without_gt_mask"] == 1
        assert evaluation[supervision]["val_images"] == 3
    assert (project / "reports/index.html").is_file()
    assert "skipped 1" in outputs["attribute"].stdout
