"""Stage 6: the paper's metrics for every trained segmenter, weak/full ratios, HTML report.

``python -m flows.evaluate --params params.yaml``
"""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from bbam.evaluate import write_metrics, write_pr_curves
from bbam.report import write_report
from flows.common import publish_table, stage_cli
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
ARTIFACT = "bbam-segmenter-metrics"
REPORT_ARTIFACT = "bbam-report"
SEGMENTER_COLUMNS = {
    "sem_miou": "semantic mIoU (%)",
    "ins_ap25": "instance AP25 (%)",
    "ins_ap50": "instance AP50 (%)",
    "ins_ap70": "instance AP70 (%)",
    "ins_ap75": "instance AP75 (%)",
    "ins_abo": "instance ABO (%)",
    "val_images": "val images",
    "val_images_without_gt_mask": "val images without GT mask",
}


def _ratio(weak: float | None, full: float | None) -> float | None:
    return round(100.0 * weak / full, 2) if weak is not None and full else None


# Below this, the full-supervision model has not learned the task, and a weak/full ratio
# compares two kinds of noise (a weak model can even "beat" it).
MEANINGFUL_FULL = 30.0


def summary_table(per_supervision: dict, pseudo: dict) -> dict:
    """The flat numbers the end-of-demo table and the report headline show (percent).

    Each bbam/full ratio stands beside the paper's only when its own full-supervision model is
    meaningful (DeepLab's mIoU, Mask R-CNN's AP50 at least MEANINGFUL_FULL: they are two
    networks, one can learn while the other does not); otherwise the row says why not.
    """
    table = {}
    if pseudo:
        table["pseudo-label mean instance IoU vs GT (%)"] = pseudo.get("pseudo_mean_instance_iou")
        table["pseudo-label semantic mIoU vs GT (%)"] = pseudo.get("pseudo_sem_miou")
    for supervision, metrics in per_supervision.items():
        table[f"semantic mIoU {supervision} (%)"] = metrics.get("sem_miou")
        table[f"instance AP50 {supervision} (%)"] = metrics.get("ins_ap50")
    full, weak = per_supervision.get("full", {}), per_supervision.get("bbam", {})
    rows = (
        ("semantic bbam/full (%)  [paper 96.7]", "sem_miou", "mIoU"),
        ("instance AP50 bbam/full (%)  [paper 92.2]", "ins_ap50", "AP50"),
    )
    for label, key, name in rows:
        ratio = _ratio(weak.get(key), full.get(key))
        if ratio is not None and full[key] < MEANINGFUL_FULL:
            label = label.split("  [")[0]
            ratio = (
                f"not meaningful: the full-supervision model is itself weak "
                f"({name} {full[key]:.1f} < {MEANINGFUL_FULL:.0f})"
            )
        table[label] = ratio
    return table


def segmenter_table(per_supervision: dict) -> list[dict]:
    """One row per supervision (``full``, ``bbam``, ``box``): the segmenters' scores on val."""
    return [
        {"supervision": supervision, **{label: m.get(k) for k, label in SEGMENTER_COLUMNS.items()}}
        for supervision, m in per_supervision.items()
    ]


def _cell(value) -> str:
    text = "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|")


def report_markdown(table: dict, report: Path) -> str:
    """The final metrics (``summary_table``) as a Markdown table and a link to the HTML report:
    a file:// link (the report lies beside the run, not on the Prefect server) and its path."""
    lines = ["| metric | value |", "| --- | --- |"]
    lines += [f"| {_cell(name)} | {_cell(value)} |" for name, value in table.items()]
    uri = report.resolve().as_uri()
    return "\n".join(
        ["# BBAM results", "", *lines, "", f"Report: [{report}]({uri}) (`{report.resolve()}`)"]
    )


def publish_results(per_supervision: dict, table: dict, report: Path) -> tuple[UUID, UUID]:
    """The evaluate stage's artifacts: the segmenters' scores as a table, and the final
    metrics with the report's link as Markdown (what a reader of the UI wants first)."""
    scores = publish_table(
        ARTIFACT, segmenter_table(per_supervision), f"Segmenter scores on val ({METRICS})."
    )
    markdown = create_markdown_artifact(
        report_markdown(table, report),
        key=REPORT_ARTIFACT,
        description=f"Final metrics ({METRICS}) and the HTML report.",
    )
    return scores, markdown


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
    extras = report_extras(params, samples, curves)
    path = write_report(REPORT_DIR, {**per_supervision, **metrics["table"]}, samples, **extras)
    publish_results(per_supervision, metrics["table"], Path(path))
    print(f"[bbam] evaluate: report at {path}")
    return metrics


def report_extras(params: dict, samples: list[dict], curves: dict) -> dict:
    """What the report shows beyond `report_samples` (bbam.report.write_report's keywords):
    per sample its BBAM heat map, GT and both segmenters' semantic predictions; the
    pseudo labels beside the filled-box and GrabCut baselines, as the pseudo_labels stage
    scored them (not recomputed here); the PR curves drawn."""
    import pyarrow.parquet as pq

    from bbam.evaluate import records_with_gt_masks
    from bbam.report import attribution_heatmaps, read_pseudo_label_baselines
    from bbam.segmenters.semantic import load_semantic_model, predict_semantic
    from bbam.segmenters.targets import render_label_map
    from tasks.attribution_config import engine_config, shard_dir
    from tasks.params import ATTRIBUTION_DIR, BASELINES_NAME, PSEUDO_DIR, load_split
    from tasks.segmenters import segmenter_dir, semantic_config

    section = params["attribution"]
    split = load_split(params, section["split"])
    by_id = {r.image_id: r for r in split.records}
    records = [by_id[s["name"]] for s in samples if s["name"] in by_id]
    attribution = ATTRIBUTION_DIR
    heat = attribution_heatmaps(
        records,
        pq.read_table(attribution / "manifest.parquet").to_pylist(),
        {s: shard_dir(attribution, s) for s in range(int(section["num_shards"]))},
        engine_config(params).align_corners,
    )
    predictions = {}
    for supervision in params["segmenters"]["supervisions"]:
        config = semantic_config(params, supervision)
        model = load_semantic_model(
            segmenter_dir("semantic", supervision) / "model.pt", config, len(split.classes) + 1
        )
        predictions[supervision] = {
            r.image_id: label
            for r, label in predict_semantic(model, records, config.device, scale=config.scale)
        }
    with_gt = {r.image_id for r in records_with_gt_masks(records)[0]}
    for sample in samples:
        record = by_id.get(sample["name"])
        if record is not None:
            sample["bbam_map"] = heat[record.image_id]
            sample["gt"] = render_label_map(record) if record.image_id in with_gt else None
            sample["predictions"] = {s: p[record.image_id] for s, p in predictions.items()}
    quality, images = read_pseudo_label_baselines(PSEUDO_DIR / BASELINES_NAME)
    return {
        "curves": curves,
        "class_names": list(split.classes),
        "pseudo_quality": quality,
        "pseudo_quality_images": images,
    }


if __name__ == "__main__":
    stage_cli("evaluate", evaluate_flow)
