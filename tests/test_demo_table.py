"""The end-of-demo table: baselines side by side, paper ratios only beside a meaningful model."""

import importlib
import json

from flows.evaluate import MEANINGFUL_FULL, summary_table


def _per_supervision(full_sem, full_ap, weak_sem, weak_ap):
    return {
        "full": {"sem_miou": full_sem, "ins_ap50": full_ap},
        "bbam": {"sem_miou": weak_sem, "ins_ap50": weak_ap},
    }


def test_ratios_stand_beside_the_paper_only_when_full_supervision_learned():
    table = summary_table(_per_supervision(70.0, 64.0, 66.5, 57.6), {})
    assert table["semantic bbam/full (%)  [paper 96.7]"] == 95.0
    assert table["instance AP50 bbam/full (%)  [paper 92.2]"] == 90.0

    weak = summary_table(_per_supervision(18.3, 7.8, 22.9, 6.7), {})
    assert not any("[paper" in key for key in weak)
    assert weak["semantic bbam/full (%)"] == (
        f"not meaningful: the full-supervision model is itself weak (mIoU 18.3 < {MEANINGFUL_FULL:.0f})"
    )
    assert weak["instance AP50 bbam/full (%)"].endswith(f"(AP50 7.8 < {MEANINGFUL_FULL:.0f})")
    # two networks: a weak DeepLab says nothing of Mask R-CNN, and the other way round
    half = summary_table(_per_supervision(27.9, 84.0, 30.4, 57.0), {})
    assert half["semantic bbam/full (%)"].startswith("not meaningful")
    assert "AP50" not in half["semantic bbam/full (%)"]
    assert half["instance AP50 bbam/full (%)  [paper 92.2]"] == 67.86


def test_demo_quality_reads_the_demo_run(tmp_path):
    metrics = {
        "detector": {"box_ap50": 0.853},
        "attribution": {"ok": 190, "no_positive": 10, "failed": 0},
        "pseudo_labels": {
            "mean_instance_iou_vs_gt": 80.1,
            "mean_instance_iou_grabcut": 75.0,
            "mean_instance_iou_box": 45.0,
        },
        "evaluation": _per_supervision(70.0, 64.0, 66.5, 57.6),
    }
    for name, value in metrics.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(value))
    out = importlib.import_module("bench.run_all").demo_quality_object(tmp_path)
    assert out == {
        "detector_ap50": 85.3,
        "no_positive_fraction": 5.0,
        "miou_bbam": 80.1,
        "miou_grabcut": 75.0,
        "miou_box": 45.0,
        "sem_miou_full": 70.0,
        "sem_miou_bbam": 66.5,
        "ins_ap50_full": 64.0,
        "ins_ap50_bbam": 57.6,
    }
