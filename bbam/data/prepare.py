"""The data stage: fetch (or find) archives, extract them, lay them out for the readers.

Layout under `root` (relative symlinks into `<download_dir>/extracted/<archive>`, so the
extracted trees are written once and a re-run with unchanged archives does no work):
  VOC:  VOC2012/ (VOCdevkit/VOC2012), SBD/ (benchmark_RELEASE/dataset: cls, inst, img,
        train.txt, val.txt), MCG/<image_id>.mat
  COCO: coco/{train2017,val2017,annotations}, MCG/<image_id>.mat (2014 names mapped to the
        2017 file stem, e.g. COCO_val2014_000000000139.mat -> 000000000139.mat)
  synthetic: generated in place (VOC2012/ + annotations/instances_{train,val}.json).
A summary (images and instances per class per split) is returned and optionally written as
JSON for DVC to track as metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from bbam.data.download import (
    ARCHIVES,
    DATASET_ARCHIVES,
    Archive,
    DownloadConfig,
    DownloadError,
    LockFile,
    expected_sha256,
    fetch_archive,
    write_json_atomic,
)
from bbam.data.extract import extract_archive, extraction_done
from bbam.data.records import DataError, Dataset

DATASETS = ("voc", "coco", "synthetic")
_COCO2014 = re.compile(r"^COCO_(?:train|val|test)20\d\d_(\d+)$")


def summarize_dataset(dataset: Dataset) -> dict:
    """Images, instances per class, and what the readers skipped or repaired (counts per
    reason) of one split (the DVC metrics)."""
    per_class = dict.fromkeys(dataset.classes, 0)
    for record in dataset.records:
        for inst in record.instances:
            per_class[dataset.classes[inst.label - 1]] += 1
    return {
        "images": len(dataset.records),
        "instances": sum(per_class.values()),
        "instances_per_class": per_class,
        "skipped": dict(dataset.skipped.counts),
        "repaired": dict(dataset.repaired.counts),
    }


def summarize_split(
    annotation_json: Path, image_root: Path, *, workers: int = 0, progress: bool = False
) -> dict:
    """`summarize_dataset` of a COCO split plus the verification of all its images
    (`bbam.data.verify.check_split`: unreadable ones are listed and counted as skipped)."""
    from bbam.data.coco import read_coco
    from bbam.data.verify import check_split

    dataset = read_coco(annotation_json, image_root, with_masks=False)
    split = Path(annotation_json).stem.removeprefix("instances_")
    checked = check_split(dataset, workers=workers, progress=progress, split=split)
    return summarize_dataset(dataset) | checked


def summary_line(summary: dict) -> str:
    """One split's summary as the stage prints it: counts, then every skip and repair."""
    line = f"{summary['images']} images / {summary['instances']} instances"
    for key in ("skipped", "repaired"):
        if summary.get(key):
            line += f", {key} " + " ".join(f"{k}={v}" for k, v in sorted(summary[key].items()))
    return line


def obtain_archive(
    archive: Archive,
    download_dir: Path,
    *,
    archives_dir: Path | None,
    lock: LockFile,
    download: DownloadConfig,
) -> Path:
    """Extracted folder of `archive`; fetch/verify/extract only what is not already done."""
    target = Path(download_dir) / "extracted" / archive.extract_to
    want = expected_sha256(archive, lock)
    if want is not None and extraction_done(target, want):
        return target
    path, sha = fetch_archive(
        archive, download_dir, archives_dir=archives_dir, lock=lock, config=download
    )
    try:
        return extract_archive(path, target, sha, name=archive.name)
    except DataError as exc:  # unsafe members, damaged, not an archive: no reference sha256
        forgotten = lock.forget(archive, sha)
        moved = _quarantine(path, Path(download_dir))
        if forgotten or moved:
            notes = [f"its sha256 is not kept in {lock.path}"] if forgotten else []
            notes += [f"moved to {moved}, so the next run fetches it afresh"] if moved else []
            raise type(exc)(f"{exc} ({'; '.join(notes)}: put a good archive in its place)") from exc
        raise


def _quarantine(path: Path, download_dir: Path) -> Path | None:
    """Rename a refused archive that lies in `download_dir` to ``<name>.bad`` (as a checksum
    mismatch is), so that the next run fetches the file afresh instead of reusing it; a file
    elsewhere (``--from-dir``, read-only perhaps) is the user's to replace. Returns the new
    path, or None when the file was left where it is."""
    if not path.is_file() or path.parent.resolve() != download_dir.resolve():
        return None
    moved = path.with_name(path.name + ".bad")
    os.replace(path, moved)
    return moved


def link_path(dest: Path, src: Path) -> None:
    """Point `dest` at `src` with a relative symlink (replaced atomically if it is a link).

    A real file or folder at `dest` is user data and is never clobbered.
    """
    if not src.exists():
        raise DataError(f"{src}: expected by the layout but missing from the archive")
    if dest.exists() and not dest.is_symlink():
        raise DataError(f"{dest}: exists and is not a link made by prepare; move it away")
    dest.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(src, dest.parent)
    if dest.is_symlink() and os.readlink(dest) == rel:
        return
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.link")
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(rel, tmp)
    os.replace(tmp, dest)


def mcg_image_id(stem: str) -> str:
    """MCG file stem -> image id (COCO 2014 names -> the 2017 12-digit file stem)."""
    m = _COCO2014.match(stem)
    return m.group(1) if m else stem


def link_mcg(mcg_dir: Path, sources: Iterable[Path]) -> int:
    """Link every .mat found under `sources` as `mcg_dir/<image_id>.mat`.

    An id in several sources takes the first source's file (VOC: Main, then Segmentation for
    the 2007_* images Main lacks); an id twice within one source is ambiguous and fails."""
    seen: dict[str, Path] = {}
    for src_root in sources:
        own: dict[str, Path] = {}
        for mat in sorted(Path(src_root).rglob("*.mat")):
            image_id = mcg_image_id(mat.stem)
            if image_id in own:
                raise DataError(f"{mat}: MCG id {image_id} also in {own[image_id]}")
            own[image_id] = mat
        seen = {**own, **seen}
    if not seen:
        raise DataError(f"{', '.join(map(str, sources))}: no MCG .mat files found")
    for image_id, mat in seen.items():
        link_path(mcg_dir / f"{image_id}.mat", mat)
    return len(seen)


def _one_subdir(folder: Path, name: str) -> Path:
    """`folder/name` if present, else the single top-level folder's `name` (archive wrappers)."""
    if (folder / name).exists():
        return folder / name
    hits = sorted(folder.glob(f"*/{name}"))
    if len(hits) != 1:
        raise DataError(f"{folder}: expected one '{name}' folder in the extracted archive")
    return hits[0]


def _summaries_voc(root: Path) -> dict:
    from bbam.data.voc import read_voc

    splits = {}
    sbd = root / "SBD"
    for split in ("train_aug", "val") if sbd.exists() else ("train", "val"):
        ds = read_voc(root, split, with_masks=False, sbd_root=sbd if sbd.exists() else None)
        splits[split] = summarize_dataset(ds)
    return splits


def _summaries_coco(root: Path) -> dict:
    try:
        from bbam.data.coco import read_coco
    except ImportError:  # reader not available: count straight from the JSON
        read_coco = None
    splits = {}
    for split in ("train2017", "val2017"):
        ann = root / "coco" / "annotations" / f"instances_{split}.json"
        if not ann.is_file():
            continue
        if read_coco is not None:
            splits[split] = summarize_dataset(read_coco(ann, root / "coco" / split))
        else:
            splits[split] = _coco_json_counts(ann)
    return splits


def _coco_json_counts(ann: Path) -> dict:
    data = json.loads(ann.read_text(encoding="utf-8"))
    names = {c["id"]: c["name"] for c in data["categories"]}
    per_class = dict.fromkeys(names.values(), 0)
    for a in data["annotations"]:
        per_class[names[a["category_id"]]] += 1
    return {
        "images": len(data["images"]),
        "instances": sum(per_class.values()),
        "instances_per_class": per_class,
        "skipped": {},
        "repaired": {},
    }


def prepare_dataset(
    name: str,
    root: Path,
    archives_dir: Path | None,
    download_dir: Path,
    *,
    only: Iterable[str] | None = None,
    lock_path: Path | None = None,
    download: DownloadConfig | Mapping | None = None,
    synthetic: Mapping | None = None,
    registry: Mapping[str, Archive] | None = None,
    summary_path: Path | None = None,
) -> dict:
    """Make `root` ready for the readers; return (and optionally write) the summary.

    `only` restricts to some archives (registry names, or roles: "mcg" selects every mcg_*
    role too); the summary is then computed only if the readers' inputs are all present.
    `registry` overrides the archive table (tests point it at a local server). `lock_path` defaults to
    `<download_dir>/../downloads.lock.json`.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if name == "synthetic":
        splits = _prepare_synthetic(root, synthetic or {})
    else:
        cfg = (
            download if isinstance(download, DownloadConfig) else DownloadConfig(**(download or {}))
        )
        registry = dict(ARCHIVES if registry is None else registry)
        download_dir = Path(download_dir)
        lock = LockFile.load(Path(lock_path or download_dir.parent / "downloads.lock.json"))
        roles = DATASET_ARCHIVES[name]
        wanted = set(only) if only is not None else None

        def asked(role: str, archive_name: str, word: str) -> bool:
            # "mcg" also names every mcg_* role: VOC's two MCG archives, COCO's train and val.
            return word in (role, archive_name) or role.startswith(f"{word}_")

        unknown = {w for w in wanted or () if not any(asked(*ra, w) for ra in roles.items())}
        if unknown:
            raise ValueError(f"--only {sorted(unknown)}: not part of {name} ({roles})")
        folders: dict[str, Path] = {}
        for role, archive_name in roles.items():
            if wanted is None or any(asked(role, archive_name, w) for w in wanted):
                folders[role] = obtain_archive(
                    registry[archive_name],
                    download_dir,
                    archives_dir=Path(archives_dir) if archives_dir else None,
                    lock=lock,
                    download=cfg,
                )
        splits = (_layout_voc if name == "voc" else _layout_coco)(root, folders)
    summary = {"dataset": name, "splits": splits}
    if summary_path is not None:
        write_json_atomic(Path(summary_path), summary)
    return summary


def _layout_voc(root: Path, folders: dict[str, Path]) -> dict:
    if "voc" in folders:
        link_path(root / "VOC2012", _one_subdir(folders["voc"] / "VOCdevkit", "VOC2012"))
    if "sbd" in folders:
        link_path(root / "SBD", _one_subdir(folders["sbd"], "dataset"))
    mcg = [folders[r] for r in ("mcg", "mcg_seg") if r in folders]
    if mcg:
        link_mcg(root / "MCG", mcg)
    return _summaries_voc(root) if (root / "VOC2012").exists() else {}


def _layout_coco(root: Path, folders: dict[str, Path]) -> dict:
    for role, sub in (("train", "train2017"), ("val", "val2017"), ("annotations", "annotations")):
        if role in folders:
            link_path(root / "coco" / sub, _one_subdir(folders[role], sub))
    mcg = [folders[r] for r in ("mcg_train", "mcg_val") if r in folders]
    if mcg:
        link_mcg(root / "MCG", mcg)
    return _summaries_coco(root) if (root / "coco" / "annotations").exists() else {}


def _prepare_synthetic(root: Path, params: Mapping) -> dict:
    from bbam.data.synthetic import SYNTHETIC_CLASSES, SyntheticConfig, generate_synthetic
    from bbam.data.voc import read_voc

    config = SyntheticConfig(**params)
    stamp = root / ".synthetic_config.json"
    wanted = json.loads(json.dumps(dataclasses.asdict(config)))
    if not (stamp.is_file() and json.loads(stamp.read_text()) == wanted):
        generate_synthetic(root, config)
        write_json_atomic(stamp, wanted)
    return {
        split: summarize_dataset(read_voc(root, split, classes=list(SYNTHETIC_CLASSES)))
        for split in ("train", "val")
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=DATASETS, required=True)
    p.add_argument("--root", type=Path, required=True, help="where the readers will look")
    p.add_argument("--download-dir", type=Path, default=Path("data/downloads"))
    p.add_argument("--from-dir", type=Path, default=None, help="archives on disk; no network")
    p.add_argument("--only", action="append", default=None, help="archive name or role")
    p.add_argument("--lock", type=Path, default=Path("data/downloads.lock.json"))
    p.add_argument("--summary", type=Path, default=None, help="write the summary JSON here")
    p.add_argument("--retries", type=int, default=DownloadConfig.retries)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        summary = prepare_dataset(
            args.dataset,
            args.root,
            args.from_dir,
            args.download_dir,
            only=args.only,
            lock_path=args.lock,
            download=DownloadConfig(retries=args.retries, progress=not args.no_progress),
            summary_path=args.summary,
        )
    except (DownloadError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
