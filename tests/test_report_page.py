"""The report as a person sees it: every panel of a sample (image, BBAM map, pseudo label
with ignore band, GT, both models' predictions) upsampled, the metrics and the pseudo-label
baselines tables filled, PR curves drawn; then the page opened in headless Chromium
(skipped when chromium is absent), which must show every image and no empty table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bbam import report

CHROMIUM = report.find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)"
)


def _sample(h: int = 48, w: int = 64) -> dict:
    rng = np.random.default_rng(0)
    fg = np.zeros((h, w), bool)
    fg[10:30, 12:40] = True
    gt = fg.astype(np.uint8) * 3
    return {
        "name": "img-1",
        "image": rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
        "bbam_map": rng.random((h, w)),
        "pseudo_fg": fg,
        "pseudo_ignore": np.roll(fg, 4, 1) & ~fg,
        "gt": gt,
        "predictions": {"bbam": np.roll(gt, 2, 0), "full": gt},
    }


CURVES = {
    "bbam": {"1": {"precision": [1.0, 0.8, 0.6], "recall": [0.2, 0.5, 0.7]}, "3": {
        "precision": [1.0], "recall": [0.1]}},
    "full": {"1": {"precision": [1.0, 0.9], "recall": [0.3, 0.8]}},
}  # fmt: skip
METRICS = {
    "bbam": {"sem_miou": 40.0, "ins_ap50": 30.0},
    "full": {"sem_miou": 50.0, "ins_ap50": 40.0},
}
PSEUDO = {
    "bbam": {"pseudo_mean_instance_iou": 70.0, "pseudo_sem_miou": 65.0},
    "box": {"pseudo_mean_instance_iou": 60.0, "pseudo_sem_miou": 55.0},
    "grabcut": {"pseudo_mean_instance_iou": 66.0, "pseudo_sem_miou": 61.0},
}


def _write(out: Path, **kwargs) -> Path:
    args = {
        "curves": CURVES,
        "class_names": ["ring", "star", "moon"],
        "pseudo_quality": PSEUDO,
        "pseudo_quality_images": 7,
    } | kwargs
    return report.write_report(out, METRICS, [_sample()], **args)


def test_sample_panels_pr_curves_and_baselines_are_on_the_page(tmp_path: Path) -> None:
    page = _write(tmp_path / "rep")
    text = page.read_text()
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", text)
    assert captions[:2] == ["instance AP50 PR curves: bbam", "instance AP50 PR curves: full"]
    assert captions[2:] == [
        "image",
        "BBAM map",
        "pseudo label (fg, ignore band)",
        "GT",
        "prediction (bbam)",
        "prediction (full)",
    ]
    for name in re.findall(r'src="([^"]+)"', text):
        png = Image.open(tmp_path / "rep" / name)
        if name.startswith("sample"):
            assert png.size == (64 * 6, 48 * 6)  # 48 px -> at least 256: x6, nearest
        else:
            assert png.size == (560, 420)
            pixels = np.asarray(png)
            assert (pixels != 255).any(axis=2).mean() > 0.02  # axes, grid, lines, text
    # pseudo-label table: BBAM beside the filled box and GrabCut, on the same 7 images
    assert (
        "filled box" in text
        and "GrabCut" in text
        and "the 7 images whose every instance has one" in text
    )
    assert "66.0000" in text and "not computed" not in text
    assert "plots/pr_curves_&lt;supervision&gt;.csv" in text


def test_missing_baselines_leave_a_visible_hook(tmp_path: Path) -> None:
    text = _write(tmp_path / "rep", pseudo_quality={"bbam": PSEUDO["bbam"]}).read_text()
    assert text.count('<td class="missing">not computed</td>') == 4
    assert "pseudo_labels.baselines" in text
    none = _write(tmp_path / "none", pseudo_quality={}, pseudo_quality_images=0).read_text()
    assert "cannot be scored" in none and "filled box" not in none


def test_baselines_are_read_as_the_pseudo_labels_stage_recorded_them(tmp_path: Path) -> None:
    """The report shows the stage's numbers (bbam.labeling.baseline_quality), never rescored."""
    recorded = {
        "images": 3,
        "instances": 5,
        "methods": {
            "bbam": {"pseudo_mean_instance_iou": 71.5, "pseudo_sem_miou": 60.25},
            "box": {"pseudo_mean_instance_iou": 55.0, "pseudo_sem_miou": 48.0},
            "grabcut": {"pseudo_mean_instance_iou": 62.0, "pseudo_sem_miou": None},
        },
    }
    path = tmp_path / "baselines.json"
    path.write_text(json.dumps(recorded))
    quality, images = report.read_pseudo_label_baselines(path)
    assert images == 3 and quality == recorded["methods"]
    assert set(quality["grabcut"]) == set(report.PSEUDO_METRICS)
    assert report.read_pseudo_label_baselines(tmp_path / "absent.json") == ({}, None)


def test_combined_heatmap_is_the_scaled_max() -> None:
    a = np.zeros((4, 4), np.float32)
    a[0, 0] = 0.5
    b = np.full((4, 4), 0.25, np.float32)
    heat = report.combined_heatmap([a, None, b], (4, 4))
    assert heat[0, 0] == 1.0 and heat[3, 3] == 0.5
    assert not report.combined_heatmap([], (2, 3)).any()


@needs_chromium
def test_report_renders_in_chromium(tmp_path: Path) -> None:
    found = report.check_in_browser(_write(tmp_path / "rep"), CHROMIUM)
    assert len(found["images"]) == 8
    assert all(image["shown"] >= 256 for image in found["images"])
    assert found["tables"] and all(found["tables"])


@needs_chromium
def test_chromium_check_fails_on_a_missing_image_or_an_empty_table(tmp_path: Path) -> None:
    page = _write(tmp_path / "rep")
    (tmp_path / "rep" / "sample000_3.png").unlink()
    with pytest.raises(report.ReportCheckError, match="sample000_3.png did not load"):
        report.check_in_browser(page, CHROMIUM)
    empty = report.write_report(
        tmp_path / "empty", {"bbam": {"sem_miou": None}}, [_sample()], pseudo_quality=PSEUDO
    )
    with pytest.raises(report.ReportCheckError, match="table 0 has no filled row"):
        report.check_in_browser(empty, CHROMIUM)
