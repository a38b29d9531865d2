"""Benchmark: the data stage's image verification (full decode of every image).

    python bench/data_check.py [--synthetic-images 10000] [--workers 0] [--no-write]

Times ``bbam.data.verify.verify_images`` as prepare_data runs it (worker processes, one
per core with ``--workers 0``) on the demo set (the params' train + val images; generated
into a temporary folder from the params' ``synthetic`` section when not prepared yet) and
on ``--synthetic-images`` small random JPEGs generated into a temporary folder. Each set
is timed cold (empty cache: every file decoded) and warm (the re-run a cache saves).
Merges ``data_check`` into bench/results.json; ``images_per_s`` is the cold rate on the
large set, ``demo_images_per_s`` the cold rate on the demo set (in-process below
``bbam.data.verify.PARALLEL_FROM`` files, as the stage runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.results import merge_results

ROOT = Path(__file__).resolve().parent.parent
SYNTHETIC_IMAGES = 10_000  # the large set make bench times (issue #18: a 10k-image set)


def demo_images(params_path: Path, scratch: Path) -> list[Path]:
    """Image paths of the params' train and val splits (the demo data), generated if absent."""
    from bbam.data.coco import read_coco
    from bbam.data.synthetic import SyntheticConfig, generate_synthetic
    from tasks.params import load_params, split_paths

    params = load_params(params_path)
    splits = [split_paths(params, s) for s in ("train", "val")]
    if not all((ROOT / ann).is_file() for ann, _ in splits):
        generate_synthetic(scratch / "demo", SyntheticConfig(**params.get("synthetic", {})))
        root = scratch / "demo"
        splits = [
            (root / "annotations" / f"instances_{s}.json", root / "VOC2012" / "JPEGImages")
            for s in ("train", "val")
        ]
    else:
        splits = [(ROOT / ann, ROOT / images) for ann, images in splits]
    paths = [r.path for ann, images in splits for r in read_coco(ann, images, False).records]
    return sorted(set(paths))


def synthetic_images(folder: Path, count: int, size: tuple[int, int] = (96, 128)) -> list[Path]:
    """`count` random-noise JPEGs of `size` (h, w): hard to compress, so decoding is real work."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size[0] * 2, size[1] * 2, 3), dtype=np.uint8)
    paths = []
    for i in range(count):
        y, x = rng.integers(0, size[0]), rng.integers(0, size[1])
        path = folder / f"img_{i:06d}.jpg"
        Image.fromarray(base[y : y + size[0], x : x + size[1]]).save(path, quality=90)
        paths.append(path)
    return paths


def time_verify(paths: list[Path], cache: Path, workers: int) -> dict:
    from bbam.data.verify import verify_images

    cache.unlink(missing_ok=True)
    started = time.perf_counter()
    bad = verify_images(paths, cache=cache, workers=workers, progress=False)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    verify_images(paths, cache=cache, workers=workers, progress=False)
    warm = time.perf_counter() - started
    assert not bad, f"generated images reported unreadable: {list(bad)[:3]}"
    return {"images": len(paths), "cold_s": round(cold, 3), "cached_s": round(warm, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--synthetic-images", type=int, default=SYNTHETIC_IMAGES)
    parser.add_argument("--workers", type=int, default=0, help="0: one per core")
    parser.add_argument("--no-write", action="store_true", help="do not touch results.json")
    args = parser.parse_args(argv)
    workers = args.workers or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bbam-data-check-") as tmp:
        scratch = Path(tmp)
        demo = time_verify(demo_images(args.params, scratch), scratch / "demo.json", workers)
        started = time.perf_counter()
        paths = synthetic_images(scratch / "synthetic", args.synthetic_images)
        generate_s = time.perf_counter() - started
        large = time_verify(paths, scratch / "large.json", workers)
    rate = large["images"] / large["cold_s"] if large["cold_s"] else None
    demo_rate = demo["images"] / demo["cold_s"] if demo["cold_s"] else None
    values = {
        "images_per_s": round(rate, 1) if rate else None,
        "demo_images_per_s": round(demo_rate, 1) if demo_rate else None,
        "demo_images": demo["images"],
        "demo_s": demo["cold_s"],
        "demo_cached_s": demo["cached_s"],
        "synthetic_images": large["images"],
        "synthetic_image_size": [96, 128],
        "synthetic_s": large["cold_s"],
        "synthetic_cached_s": large["cached_s"],
        "workers": workers,
        "note": "full decode (load_rgb) in spawned processes; cached = re-run by size+mtime",
    }
    print(f"generated {large['images']} images in {generate_s:.1f} s")
    print(json.dumps(values, indent=2))
    if not args.no_write:
        merge_results("data_check", values)
    return 0


if __name__ == "__main__":
    sys.exit(main())
