"""One static HTML page a person reads: the metrics (BBAM vs full supervision, BBAM's
pseudo labels vs the filled-box and GrabCut baselines), the PR curves drawn as images,
and per sample the image, the BBAM heat map over it, the pseudo foreground with its
ignore band, the GT and the predictions of the models trained on BBAM and on full masks,
upsampled so that small images stay readable. PIL only (no matplotlib).

``python -m bbam.report check reports/index.html`` (``make report-check``) opens the page
in headless Chromium and fails on an image that does not load or shows too small, or on
an empty table.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bbam.atomic import atomic_write_bytes
from bbam.data.palette import voc_colormap
from bbam.segmenters.targets import SUPERVISIONS

# The paper's weak/full ratios (BBAM vs fully supervised), for reference in the page.
PAPER_RATIOS = {"semantic mIoU": 0.967, "instance AP50": 0.922}
# Pseudo-label methods compared on the same instances (bbam.baselines), scored by the
# pseudo_labels stage; see read_pseudo_label_baselines.
PSEUDO_METHODS = {"bbam": "BBAM", "box": "filled box", "grabcut": "GrabCut"}
PSEUDO_METRICS = {
    "pseudo_mean_instance_iou": "mean instance IoU vs GT (%)",
    "pseudo_sem_miou": "semantic mIoU vs GT (%)",
}
MIN_SIDE = 256  # panels are shown with their shorter side at least this many pixels
MAX_UPSCALE = 8
CMAP = voc_colormap(256)


def _save_png(path: Path, rgb: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8), mode="RGB").save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def upscale(rgb: np.ndarray, min_side: int = MIN_SIDE) -> np.ndarray:
    """Nearest-neighbour integer upsampling until the shorter side reaches ``min_side``
    (pixels stay crisp: a 128x176 image is shown 2x, never blurred)."""
    factor = min(MAX_UPSCALE, max(1, math.ceil(min_side / max(1, min(rgb.shape[:2])))))
    return np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1) if factor > 1 else rgb


def _blend(image: np.ndarray, color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """image (H,W,3) uint8, color (H,W,3) or (3,), alpha (H,W) in [0,1] -> uint8."""
    a = np.clip(alpha, 0, 1)[..., None]
    return (image.astype(np.float32) * (1 - a) + np.asarray(color, np.float32) * a).astype(np.uint8)


def _heat(values: np.ndarray) -> np.ndarray:
    """[0,1] -> simple blue-to-red heat colours (no matplotlib)."""
    v = np.clip(values, 0, 1)
    return np.stack([255 * v, 255 * (1 - np.abs(2 * v - 1)), 255 * (1 - v)], -1)


def overlay_map(image: np.ndarray, attribution: np.ndarray) -> np.ndarray:
    """BBAM map (HxW float in [0,1]) as a heat overlay, opacity growing with the value."""
    return _blend(image, _heat(attribution), 0.25 + 0.5 * np.clip(attribution, 0, 1))


def overlay_pseudo(
    image: np.ndarray, fg: np.ndarray | None, ignore: np.ndarray | None
) -> np.ndarray:
    """Foreground in green, ignore band in yellow."""
    out = image
    if fg is not None:
        out = _blend(out, np.array([0, 220, 0]), 0.55 * np.asarray(fg, np.float32))
    if ignore is not None:
        out = _blend(out, np.array([255, 220, 0]), 0.55 * np.asarray(ignore, np.float32))
    return out


def overlay_prediction(image: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """A label map (HxW ints, VOC colours, 255 shown too) or instance masks (N,H,W bool)."""
    pred = np.asarray(prediction)
    if pred.ndim == 3:
        label = np.zeros(pred.shape[1:], dtype=np.int64)
        for k, m in enumerate(pred.astype(bool)):
            label[m] = k % 254 + 1
    else:
        label = pred.astype(np.int64)
    return _blend(image, CMAP[label], 0.55 * (label > 0))


def combined_heatmap(maps: Iterable[np.ndarray | None], shape: tuple[int, int]) -> np.ndarray:
    """One image's instance maps (original resolution) -> their pixel-wise max, scaled to
    [0, 1] by the largest value (instances without a map contribute nothing)."""
    out = np.zeros(shape, np.float32)
    for m in maps:
        if m is not None:
            out = np.maximum(out, np.asarray(m, np.float32))
    peak = float(out.max())
    return out / peak if peak > 0 else out


def attribution_heatmaps(
    records: Iterable[Any],
    manifest_rows: Iterable[dict],
    shard_dirs: Mapping[int, Path],
    align_corners: bool = True,
) -> dict[str, np.ndarray]:
    """image_id -> combined BBAM heat map of its instances, read from the attribution
    manifest rows (``runs/attribution/manifest.parquet``) as the pseudo-label stage reads
    them (``bbam.labeling.instance_map``)."""
    from bbam.labeling import instance_map

    records = list(records)
    wanted = {r.image_id for r in records}
    rows: dict[str, list[dict]] = {}
    for row in manifest_rows:
        if row["image_id"] in wanted:
            rows.setdefault(row["image_id"], []).append(row)
    cache: dict = {}
    out = {}
    for record in records:
        maps = []
        for row in rows.get(record.image_id, []):
            shard_dir = shard_dirs.get(int(row["shard"]))
            if shard_dir is not None:
                maps.append(instance_map(row, shard_dir, cache, align_corners))
        out[record.image_id] = combined_heatmap(maps, (record.height, record.width))
    return out


def read_pseudo_label_baselines(path: str | Path) -> tuple[dict[str, dict[str, Any]], int | None]:
    """BBAM's pseudo masks beside the filled box and GrabCut, as the pseudo_labels stage
    scored them (``bbam.labeling.baseline_quality``, written with ``pseudo_labels.baselines``
    on): ({method: {pseudo_mean_instance_iou, pseudo_sem_miou} in %}, images scored). A
    missing file (baselines off) gives ({}, None): the page then says "not computed"."""
    path = Path(path)
    if not path.is_file():
        return {}, None
    recorded = json.loads(path.read_text(encoding="utf-8"))
    methods = recorded.get("methods") or {}
    quality = {
        m: {k: methods[m].get(k) for k in PSEUDO_METRICS} for m in PSEUDO_METHODS if m in methods
    }
    return quality, int(recorded.get("images", 0))


# ----------------------------------------------------------------------------- PR curves


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_pr_curves(
    curves: Mapping[Any, Mapping[str, list]],
    title: str,
    class_names: list[str] | None = None,
    size: tuple[int, int] = (560, 420),
) -> np.ndarray:
    """Per-class precision/recall curves (``voc_instance_metrics``' ``pr_curves_ap50``) as
    an RGB image: axes 0..1 with a 0.2 grid, one VOC-coloured line per class, a legend."""
    width, height = size
    left, right, top, bottom = 56, 150, 34, 46
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    font, small = _font(15), _font(12)
    x0, x1, y0, y1 = left, width - right, top, height - bottom

    def xy(recall: float, precision: float) -> tuple[float, float]:
        return x0 + recall * (x1 - x0), y1 - precision * (y1 - y0)

    for k in range(6):
        t = k / 5
        gx, gy = xy(t, t)
        draw.line([(gx, y0), (gx, y1)], fill=(225, 225, 225))
        draw.line([(x0, gy), (x1, gy)], fill=(225, 225, 225))
        draw.text((gx, y1 + 6), f"{t:.1f}", fill="black", font=small, anchor="mt")
        draw.text((x0 - 6, gy), f"{t:.1f}", fill="black", font=small, anchor="rm")
    draw.rectangle([x0, y0, x1, y1], outline="black")
    draw.text(((x0 + x1) / 2, height - 8), "recall", fill="black", font=font, anchor="mb")
    draw.text((8, (y0 + y1) / 2), "precision", fill="black", font=small, anchor="lm")
    draw.text((width / 2, 8), title, fill="black", font=font, anchor="mt")
    for n, (cls, curve) in enumerate(sorted(curves.items(), key=lambda kv: int(kv[0]))):
        color = tuple(int(v) for v in CMAP[int(cls) % 255 or 1])
        recall = list(curve.get("recall", []))
        precision = list(curve.get("precision", []))
        points = [xy(r, p) for r, p in zip(recall, precision, strict=True)]
        if len(points) == 1:
            px, py = points[0]
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        elif points:
            draw.line(points, fill=color, width=3)
        name = class_names[int(cls) - 1] if class_names else f"class {cls}"
        ly = y0 + 6 + 18 * n
        draw.line([(x1 + 12, ly + 6), (x1 + 32, ly + 6)], fill=color, width=4)
        draw.text((x1 + 38, ly), name, fill="black", font=small)
    return np.asarray(canvas)


# ----------------------------------------------------------------------------- HTML


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}"
    return html.escape(str(v))


def _table(metrics: dict[str, Any]) -> str:
    """Nested {supervision: {metric: v}} -> one column per supervision + weak/full ratio column;
    anything else -> a two-column key/value table."""
    nested = {k: v for k, v in metrics.items() if k in SUPERVISIONS and isinstance(v, dict)}
    rows = []
    if nested:
        cols = [s for s in SUPERVISIONS if s in nested]
        names = sorted(
            {m for d in nested.values() for m, v in d.items() if not isinstance(v, dict)}
        )
        head = "".join(f"<th>{c}</th>" for c in cols) + "<th>bbam/full</th>"
        rows.append(f"<tr><th>metric</th>{head}</tr>")
        for name in names:
            vals = [nested[c].get(name) for c in cols]
            weak, full = nested.get("bbam", {}).get(name), nested.get("full", {}).get(name)
            ratio = (
                weak / full
                if isinstance(weak, float) and isinstance(full, float) and full
                else None
            )
            cells = "".join(f"<td>{_fmt(v)}</td>" for v in vals)
            rows.append(f"<tr><td>{html.escape(name)}</td>{cells}<td>{_fmt(ratio)}</td></tr>")
    flat = {k: v for k, v in metrics.items() if k not in nested and not isinstance(v, dict)}
    if flat:
        rows.append('<tr><th colspan="2">other</th></tr>')
        for k, v in sorted(flat.items()):
            rows.append(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>")
    return '<table class="metrics">' + "\n".join(rows) + "</table>"


def _pseudo_table(
    pseudo_quality: Mapping[str, Mapping[str, Any]] | None, images: int | None
) -> str:
    """BBAM's pseudo labels beside the box-only baselines; a method not given is shown as
    not computed, with the hook that fills it."""
    if pseudo_quality is not None and images == 0:
        return (
            "<p class='missing'>No labelled image has a GT mask for every instance: the pseudo "
            "labels cannot be scored (boxes alone can be labelled, not evaluated).</p>"
        )
    pseudo_quality = pseudo_quality or {}
    head = "".join(f"<th>{html.escape(label)}</th>" for label in PSEUDO_METHODS.values())
    rows = [f"<tr><th>pseudo labels</th>{head}</tr>"]
    for key, label in PSEUDO_METRICS.items():
        cells = "".join(
            f"<td>{_fmt(pseudo_quality[m].get(key))}</td>"
            if m in pseudo_quality
            else '<td class="missing">not computed</td>'
            for m in PSEUDO_METHODS
        )
        rows.append(f"<tr><td>{html.escape(label)}</td>{cells}</tr>")
    where = (
        f" (instance IoU on every instance with a GT mask, semantic mIoU on the {images} "
        "images whose every instance has one)"
        if images
        else ""
    )
    note = (
        f"<p>Pseudo masks of the labelled split vs its GT masks{where}: BBAM's (the pseudo "
        "labels the segmenters were trained on) and the two box-only baselines of "
        "<code>bbam.baselines</code>, scored alike by the pseudo_labels stage.</p>"
    )
    missing = [PSEUDO_METHODS[m] for m in PSEUDO_METHODS if m not in pseudo_quality]
    if missing:
        note += (
            f"<p class='missing'>Not computed: {html.escape(', '.join(missing))} (set "
            "<code>pseudo_labels.baselines: true</code> and rerun the pseudo_labels stage).</p>"
        )
    return note + '<table class="metrics">' + "\n".join(rows) + "</table>"


def _figure(out_dir: Path, name: str, title: str, rgb: np.ndarray, min_side: int) -> str:
    shown = upscale(rgb, min_side)
    _save_png(out_dir / name, shown)
    h, w = shown.shape[:2]
    return (
        f'<figure><img src="{name}" width="{w}" height="{h}" alt="{html.escape(title)}">'
        f"<figcaption>{html.escape(title)}</figcaption></figure>"
    )


def _sample_panels(sample: dict[str, Any], n: int) -> list[tuple[str, np.ndarray]]:
    image = np.asarray(sample["image"], dtype=np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"sample {n}: image must be HxWx3 uint8, got shape {image.shape}")
    panels = [("image", image)]
    if sample.get("bbam_map") is not None:
        panels.append(("BBAM map", overlay_map(image, np.asarray(sample["bbam_map"], np.float32))))
    if sample.get("pseudo_fg") is not None or sample.get("pseudo_ignore") is not None:
        panels.append(
            (
                "pseudo label (fg, ignore band)",
                overlay_pseudo(image, sample.get("pseudo_fg"), sample.get("pseudo_ignore")),
            )
        )
    if sample.get("gt") is not None:
        panels.append(("GT", overlay_prediction(image, sample["gt"])))
    predictions = dict(sample.get("predictions") or {})
    if sample.get("prediction") is not None:
        predictions.setdefault("model", sample["prediction"])
    for supervision, prediction in predictions.items():
        if prediction is not None:
            title = f"prediction ({supervision})"
            panels.append((title, overlay_prediction(image, prediction)))
    return panels


def write_report(
    out_dir: str | Path,
    metrics: dict[str, Any],
    samples: list[dict[str, Any]],
    *,
    curves: Mapping[str, Mapping[Any, Mapping[str, list]]] | None = None,
    class_names: list[str] | None = None,
    pseudo_quality: Mapping[str, Mapping[str, Any]] | None = None,
    pseudo_quality_images: int | None = None,
    min_side: int = MIN_SIDE,
) -> Path:
    """Write `index.html` + PNGs under out_dir; return the HTML path.

    Each sample: `image` (HxWx3 uint8, required), optional `bbam_map` (HxW float [0,1]),
    `pseudo_fg`, `pseudo_ignore` (HxW bool), `gt` (HxW label map, 255 = ignore),
    `predictions` ({supervision: label map or (N,H,W) masks}; `prediction` alone is
    shown as "model"), `name` (caption). `curves`: {supervision: {class id: {precision,
    recall}}} drawn as PNGs. `pseudo_quality`: {bbam|box|grabcut: {metric: %}}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.png"):
        stale.unlink()
    ratio_rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.1%}</td></tr>" for k, v in PAPER_RATIOS.items()
    )
    curve_figures = []
    for supervision, per_class in (curves or {}).items():
        title = f"instance AP50 PR curves: {supervision}"
        if not per_class:
            curve_figures.append(f"<p>{html.escape(title)}: no detections, no curve.</p>")
            continue
        rgb = draw_pr_curves(per_class, title, class_names)
        curve_figures.append(_figure(out_dir, f"pr_{supervision}.png", title, rgb, 0))
    figures = []
    for n, sample in enumerate(samples):
        cells = [
            _figure(out_dir, f"sample{n:03d}_{k}.png", title, rgb, min_side)
            for k, (title, rgb) in enumerate(_sample_panels(sample, n))
        ]
        caption = html.escape(str(sample.get("name", f"sample {n}")))
        figures.append(f"<h3>{caption}</h3><div class='row'>{''.join(cells)}</div>")
    curves_html = (
        "<h2>PR curves (AP50)</h2><div class='row'>" + "".join(curve_figures) + "</div>"
        "<p>Data for <code>dvc plots show</code>: <code>plots/pr_curves_&lt;supervision&gt;.csv"
        "</code>.</p>"
        if curve_figures
        else ""
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>BBAM report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #999;padding:3px 8px;text-align:right}} .row{{display:flex;flex-wrap:wrap;gap:12px}}
figure{{margin:0}} img{{image-rendering:pixelated}} figcaption{{font-size:90%;text-align:center}}
.missing{{color:#a60}}</style></head><body>
<h1>BBAM: weak (box) supervision vs full vs box-only</h1>
<h2>Metrics</h2>
{_table(metrics)}
<h2>Pseudo labels vs box-only baselines</h2>
{_pseudo_table(pseudo_quality, pseudo_quality_images)}
<h2>Paper's weak/full ratios</h2>
<table class="metrics"><tr><th>metric</th><th>BBAM / full</th></tr>{ratio_rows}</table>
{curves_html}
<h2>Samples</h2>
<p>heat: BBAM map (all instances, max); green: pseudo foreground, yellow: ignore band;
GT and predictions in VOC class colours (predictions on these labelled images, for a look,
not scored)</p>
{"".join(figures)}
</body></html>
"""
    path = out_dir / "index.html"
    atomic_write_bytes(path, page.encode("utf-8"))
    return path


# ----------------------------------------------------------------------------- browser check


class ReportCheckError(AssertionError):
    pass


CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(i => ({src: i.getAttribute("src"),
    natural: i.naturalWidth, shown: i.getBoundingClientRect().width,
    shownH: i.getBoundingClientRect().height, complete: i.complete}));
  const tables = [...document.querySelectorAll("table")].map(t =>
    [...t.rows].filter(r => [...r.cells].slice(1).some(c => c.tagName === "TD" &&
      !["", "\\u2013", "not computed"].includes(c.textContent.trim()))).length);
  const out = document.createElement("pre");
  out.id = "report-check";
  out.textContent = JSON.stringify({images, tables});
  document.body.appendChild(out);
});
</script>"""


def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def check_in_browser(
    html_path: str | Path,
    chromium: str | None = None,
    min_shown: int = 128,
    timeout_s: float = 120,
) -> dict[str, Any]:
    """Render the page in headless Chromium as a person would open it; raise
    ReportCheckError on an image that did not load or shows under ``min_shown`` px wide,
    no image at all, or a table without a filled data row. Returns what the page showed."""
    html_path = Path(html_path).resolve()
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no chromium on PATH (apt-get install -y chromium)")
    probe = html_path.with_name(".report-check.html")
    text = html_path.read_text(encoding="utf-8")
    probe.write_text(text.replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
    try:
        with tempfile.TemporaryDirectory() as profile:
            result = subprocess.run(
                [
                    chromium, "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                    "--allow-file-access-from-files", "--window-size=1600,1200",
                    "--virtual-time-budget=10000", "--dump-dom", probe.as_uri(),
                ],
                capture_output=True, text=True, timeout=timeout_s,
            )  # fmt: skip
    finally:
        probe.unlink(missing_ok=True)
    start = result.stdout.find('<pre id="report-check">')
    if start < 0:
        raise ReportCheckError(
            f"chromium did not render {html_path} (rc {result.returncode}):\n"
            + result.stderr[-2000:]
        )
    body = result.stdout[start:].split(">", 1)[1].split("</pre>", 1)[0]
    found = json.loads(html.unescape(body))
    problems = []
    if not found["images"]:
        problems.append("no image on the page")
    for image in found["images"]:
        if not image["complete"] or image["natural"] == 0:
            problems.append(f"image {image['src']} did not load")
        elif image["shown"] < min_shown:
            problems.append(f"image {image['src']} shown {image['shown']:.0f} px wide")
    if not found["tables"]:
        problems.append("no table on the page")
    for n, rows in enumerate(found["tables"]):
        if rows == 0:
            problems.append(f"table {n} has no filled row")
    if problems:
        raise ReportCheckError(f"{html_path}: " + "; ".join(problems))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bbam.report")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="render a report in headless Chromium and check it")
    check.add_argument("html", nargs="?", default="reports/index.html")
    args = parser.parse_args(argv)
    try:
        found = check_in_browser(args.html)
    except (ReportCheckError, FileNotFoundError) as exc:
        print(f"report check failed: {exc}", file=sys.stderr)
        return 1
    print(
        f"report check: {len(found['images'])} images loaded, "
        f"tables with {found['tables']} filled rows"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
