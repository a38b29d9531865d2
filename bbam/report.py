"""One static HTML page: metrics (weak vs full vs box), weak/full ratios, sample overlays (PIL)."""

from __future__ import annotations

import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bbam.atomic import atomic_write_bytes
from bbam.data.palette import voc_colormap
from bbam.segmenters.targets import SUPERVISIONS

# The paper's weak/full ratios (BBAM vs fully supervised), for reference in the page.
PAPER_RATIOS = {"semantic mIoU": 0.967, "instance AP50": 0.922}


def _save_png(path: Path, rgb: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8), mode="RGB").save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


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
        cmap = voc_colormap(256)
        label = np.zeros(pred.shape[1:], dtype=np.int64)
        for k, m in enumerate(pred.astype(bool)):
            label[m] = k % 254 + 1
    else:
        cmap = voc_colormap(256)
        label = pred.astype(np.int64)
    return _blend(image, cmap[label], 0.55 * (label > 0))


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
    return "<table>" + "\n".join(rows) + "</table>"


def write_report(
    out_dir: str | Path, metrics: dict[str, Any], samples: list[dict[str, Any]]
) -> Path:
    """Write `index.html` + overlay PNGs under out_dir; return the HTML path.

    Each sample: `image` (HxWx3 uint8, required), optional `bbam_map` (HxW float [0,1]),
    `pseudo_fg`, `pseudo_ignore` (HxW bool), `prediction` (label map or (N,H,W) masks),
    `name` (caption).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ratio_rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.1%}</td></tr>" for k, v in PAPER_RATIOS.items()
    )
    figures = []
    for n, sample in enumerate(samples):
        image = np.asarray(sample["image"], dtype=np.uint8)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"sample {n}: image must be HxWx3 uint8, got shape {image.shape}")
        panels = [("image", image)]
        if sample.get("bbam_map") is not None:
            panels.append(
                ("BBAM map", overlay_map(image, np.asarray(sample["bbam_map"], np.float32)))
            )
        if sample.get("pseudo_fg") is not None or sample.get("pseudo_ignore") is not None:
            panels.append(
                (
                    "pseudo mask",
                    overlay_pseudo(image, sample.get("pseudo_fg"), sample.get("pseudo_ignore")),
                )
            )
        if sample.get("prediction") is not None:
            panels.append(("prediction", overlay_prediction(image, sample["prediction"])))
        cells = []
        for k, (title, rgb) in enumerate(panels):
            name = f"sample{n:03d}_{k}.png"
            _save_png(out_dir / name, rgb)
            cells.append(
                f'<figure><img src="{name}" alt="{html.escape(title)}">'
                f"<figcaption>{html.escape(title)}</figcaption></figure>"
            )
        caption = html.escape(str(sample.get("name", f"sample {n}")))
        figures.append(f"<h3>{caption}</h3><div class='row'>{''.join(cells)}</div>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>BBAM report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #999;padding:3px 8px;text-align:right}} .row{{display:flex;gap:8px}}
figure{{margin:0}} img{{max-width:320px}}</style></head><body>
<h1>BBAM: weak (box) supervision vs full vs box-only</h1>
<h2>Metrics</h2>
{_table(metrics)}
<h2>Paper's weak/full ratios</h2>
<table><tr><th>metric</th><th>BBAM / full</th></tr>{ratio_rows}</table>
<h2>Samples</h2>
<p>green: pseudo foreground, yellow: ignore band, heat: BBAM map, colours: prediction</p>
{"".join(figures)}
</body></html>
"""
    path = out_dir / "index.html"
    atomic_write_bytes(path, page.encode("utf-8"))
    return path
