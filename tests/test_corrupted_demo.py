"""The pipeline on a corrupted copy of the demo data (issue #18): it stops at prepare_data
with an error naming the problem, or goes on with every problem named and counted; nothing
downstream fails.

The copy is the synthetic demo set, small, used as a custom COCO dataset, with truncated,
garbage and missing train images, boxes running out of the image, then (one at a time) an
unknown category, a garbage val image and a non-UTF-8 params file. Single stages run as
their commands (``python -m flows.<stage>``), the whole pipeline as ``dvc repro`` in a DVC
project holding a copy of the code, with the speed settings of tests/test_messy_dataset.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from helpers.project_env import REPO, copy_code, custom_data_params, project_env, run_in

from bbam.data.synthetic import SyntheticConfig, generate_synthetic

pytestmark = pytest.mark.slow

STAGES = (
    "prepare_data",
    "train_detector",
    "attribute",
    "pseudo_labels",
    "train_segmenters",
    "evaluate",
)


def _stage(project: Path, stage: str, params: str = "params.yaml") -> subprocess.CompletedProcess:
    env = project_env(project)
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", f"flows.{stage}", "--params", params]
    return subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=600)


def _failed_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "FAILED:" in line]
    assert lines, result.stderr[-3000:]
    return lines[-1]


def corrupted_demo(project: Path) -> dict:
    """The demo set under project/mydata, damaged; returns what was damaged."""
    config = SyntheticConfig(num_train=12, num_val=6, image_size=(64, 96), max_objects=2)
    generate_synthetic(project / "mydata", config)
    ann = project / "mydata/annotations/instances_train.json"
    coco = json.loads(ann.read_text())
    images = project / "mydata/VOC2012/JPEGImages"
    names = [im["file_name"] for im in coco["images"]]
    truncated, garbage, missing = (images / n for n in names[:3])
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    garbage.write_bytes(b"\x89PNG garbage" * 20)
    missing.unlink()
    by_image: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    first, second = (by_image[coco["images"][i]["id"]][0] for i in (5, 6))
    first["bbox"] = [-6.0, -4.0, first["bbox"][2] + 6, first["bbox"][3] + 4]  # negative origin
    second["bbox"][2] = 500.0  # runs past the right edge
    ann.write_text(json.dumps(coco))
    return {"ann": ann, "unreadable": {str(p) for p in (truncated, garbage, missing)}}


def _write_params(project: Path, **data) -> None:
    params = custom_data_params(num_shards=2, chunk_size=4, iterations=4)
    params["data"].update(
        train_json="mydata/annotations/instances_train.json",
        train_images="mydata/VOC2012/JPEGImages",
        val_json="mydata/annotations/instances_val.json",
        val_images="mydata/VOC2012/JPEGImages",
        max_unreadable_train=0.3,
        **data,
    )
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_corrupted_demo_stops_early_or_runs_with_every_problem_counted(tmp_path):
    project = tmp_path / "project"
    damaged = corrupted_demo(project)
    _write_params(project)

    # A params file that is not UTF-8: one clear line, no traceback.
    (project / "latin1.yaml").write_bytes("seed: 0\n# donn\xe9es\n".encode("latin-1"))
    result = _stage(project, "prepare_data", "latin1.yaml")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "latin1.yaml: not UTF-8" in result.stderr

    # An unknown category in the custom COCO file stops prepare_data, naming file and id.
    ann = damaged["ann"]
    clean = ann.read_text()
    coco = json.loads(clean)
    coco["annotations"].append(coco["annotations"][-1] | {"id": 10_000, "category_id": 999})
    ann.write_text(json.dumps(coco))
    line = _failed_line(_stage(project, "prepare_data"))
    assert "instances_train.json: annotation 10000: unknown category_id 999" in line
    ann.write_text(clean)

    # The whole pipeline, as a user runs it: dvc repro in a DVC project with the code.
    copy_code(project)
    (project / "dvc.yaml").write_bytes((REPO / "dvc.yaml").read_bytes())
    run_in(project, "dvc", "init", "--no-scm", "-q")

    # A bad val image is over val's limit (0): dvc repro stops at prepare_data, naming it.
    val_ann = json.loads((project / "mydata/annotations/instances_val.json").read_text())
    val_image = project / "mydata/VOC2012/JPEGImages" / val_ann["images"][0]["file_name"]
    good_val = val_image.read_bytes()
    val_image.write_bytes(b"not a jpeg")
    result = run_in(project, "dvc", "repro", check=False)
    line = _failed_line(result)
    assert "val: 1 of 6 images are unreadable" in line and val_image.name in line
    assert "data.max_unreadable_val" in line
    assert "Traceback" not in result.stderr and not (project / "runs/detector").exists()
    val_image.write_bytes(good_val)

    # Train's bad images are within its limit: every stage runs, every problem is counted.
    result = run_in(project, "dvc", "repro")
    assert all(f"Running stage '{stage}'" in result.stdout for stage in STAGES)
    assert "skipped unreadable_image=3" in result.stdout
    assert "repaired clipped_box=2" in result.stdout
    data = json.loads((project / "metrics/data.json").read_text())
    unreadable = data["train"]["unreadable_images"]
    assert {str(project / p) for p in unreadable} == damaged["unreadable"]
    assert sorted(unreadable.values())[0] == "image file not found"
    assert data["train"]["repaired"] == {"clipped_box": 2}
    assert data["val"]["unreadable_images"] == {}

    rows = pq.read_table(project / "runs/attribution/manifest.parquet").to_pylist()
    assert {r["status"] for r in rows} <= {"ok", "no_positive", "skipped"}  # nothing failed
    dropped = {Path(p).stem for p in unreadable}
    # the unreadable images' instances are skipped rows naming the file, never dropped
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert skipped and {r["image_id"] for r in skipped} == dropped
    assert all(r["image_id"] in r["error"] for r in skipped)
    pseudo = json.loads((project / "metrics/pseudo_labels.json").read_text())
    assert pseudo["image_errors"] == [] and pseudo["images"] == 12 - 3
    assert (project / "metrics/evaluation.json").is_file()
