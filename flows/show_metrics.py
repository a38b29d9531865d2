"""Print the metrics table of the last run and where the report is.

``python -m flows.show_metrics`` (``make demo`` ends with it).
"""

from __future__ import annotations

import json
from pathlib import Path

METRICS_DIR = Path("metrics")
REPORT = Path("reports/index.html")


def _load(name: str) -> dict:
    path = METRICS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def no_positive_percent(attribution: dict) -> float | None:
    """Percent of the attributed instances (ok, no_positive, failed) without a positive."""
    counted = sum(attribution.get(k) or 0 for k in ("ok", "no_positive", "failed"))
    no_positive = attribution.get("no_positive")
    return None if no_positive is None or not counted else 100.0 * no_positive / counted


def metrics_rows() -> list[tuple[str, str]]:
    detector = _load("detector")
    attribution = _load("attribution")
    pseudo = _load("pseudo_labels")
    evaluation = _load("evaluation")
    rows = [
        (
            "detector box AP50 (val, %)",
            _fmt(100 * detector["box_ap50"]) if "box_ap50" in detector else "-",
        ),
        (
            "attribution ok / no_positive / failed",
            "/".join(_fmt(attribution.get(k)) for k in ("ok", "no_positive", "failed")),
        ),
        (
            "train instances without a positive (%)",
            "-" if (percent := no_positive_percent(attribution)) is None else f"{percent:.1f}",
        ),
        (
            "pseudo masks IoU vs GT: bbam / grabcut / box (%)",
            " / ".join(
                _fmt(pseudo.get(k))
                for k in (
                    "mean_instance_iou_vs_gt",
                    "mean_instance_iou_grabcut",
                    "mean_instance_iou_box",
                )
            ),
        ),
    ]
    for key, value in evaluation.get("table", {}).items():
        rows.append((key, _fmt(value)))
    return rows


def show_metrics() -> None:
    rows = metrics_rows()
    width = max(len(name) for name, _ in rows)
    print("\n" + "=" * (width + 24))
    for name, value in rows:
        print(f"{name:<{width}}  {value:>20}")
    print("=" * (width + 24))
    if REPORT.is_file():
        print(f"report: {REPORT.resolve()}")


if __name__ == "__main__":
    show_metrics()
