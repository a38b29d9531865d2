"""Stage 6: the paper's metrics for every trained segmenter, weak/full ratios, HTML report.

``python -m flows.evaluate --params params.yaml``
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from bbam.evaluate import write_metrics, write_pr_curves
from bbam.report import write_report
from flows.common import stage_cli
from tasks.evaluate import (
    evaluate_instance,
    evaluate_pseudo_labels,
    evaluate_semantic,
    report_samples,
)
from tasks.params import METRICS_DIR, REPORTS_DIR

METRICS = METRICS_DIR / "evaluation.json"
REPORT_DIR = REPORTS_DIR
PLOTS_DIR = Path("plots")


def _ratio(weak: float | None, full: float | None) -> float | None:
    return round(100.0 * weak / full, 2) if weak is not None and full else None


def summary_table(per_supervision: dict, pseudo: dict) -> dict:
    """The flat numbers the end-of-demo table and the report headline show (percent)."""
    table = {}
    if pseudo:
        table["pseudo-label mean instance IoU vs GT (%)"] = pseudo.get("pseudo_mean_instance_iou")
        table["pseudo-label semantic mIoU vs GT (%)"] = pseudo.get("pseudo_sem_miou")
    for supervision, metrics in per_supervision.items():
        table[f"semantic mIoU {supervision} (%)"] = metrics.get("sem_miou")
        table[f"instance AP50 {supervision} (%)"] = metrics.get("ins_ap50")
    full, weak = per_supervision.get("full", {}), per_supervision.get("bbam", {})
    table["semantic bbam/full (%)  [paper 96.7]"] = _ratio(
        weak.get("sem_miou"), full.get("sem_miou")
    )
    table["instance AP50 bbam/full (%)  [paper 92.2]"] = _ratio(
        weak.get("ins_ap50"), full.get("ins_ap50")
    )
    return table


def _pct(value) -> float | None:
    return None if value is None or value != value else round(100.0 * float(value), 2)


@flow(name="evaluate")
def evaluate_flow(params: dict) -> dict:
    per_supervision, curves = {}, {}
    for supervision in params["segmenters"]["supervisions"]:
        semantic = evaluate_semantic(params, supervision)
        instance = evaluate_instance(params, supervision)
        voc, coco = instance["voc"], instance["coco"]
        curves[supervision] = voc.pop("pr_curves_ap50", {})
        per_supervision[supervision] = {
            "sem_miou": _pct(semantic.get("miou")),
            "ins_ap25": _pct(voc.get("ap25")),
            "ins_ap50": _pct(voc.get("ap50")),
            "ins_ap70": _pct(voc.get("ap70")),
            "ins_ap75": _pct(voc.get("ap75")),
            "ins_abo": _pct(voc.get("abo")),
            **{f"coco_{k}": _pct(v) for k, v in coco.items() if isinstance(v, float)},
            # box-only val images cannot be scored on masks: left out, counted here
            "val_images": instance["images"],
            "val_images_without_gt_mask": instance["images_without_gt_mask"],
        }
    pseudo = evaluate_pseudo_labels(params)
    pseudo_pct = {k: _pct(v) for k, v in pseudo.items() if isinstance(v, float)}
    counts = {k: v for k, v in pseudo.items() if isinstance(v, int)}  # what was scored
    metrics = {
        **per_supervision,
        "pseudo_labels": {**pseudo_pct, **counts},
        "table": summary_table(per_supervision, pseudo_pct),
    }
    write_metrics(METRICS, metrics)
    for supervision, curve in curves.items():
        write_pr_curves(PLOTS_DIR / f"pr_curves_{supervision}.csv", curve)
    samples = report_samples(params, int(params.get("evaluate", {}).get("report_samples", 8)))
    path = write_report(REPORT_DIR, {**per_supervision, **metrics["table"]}, samples)
    print(f"[bbam] evaluate: report at {path}")
    return metrics


if __name__ == "__main__":
    stage_cli("evaluate", evaluate_flow)
