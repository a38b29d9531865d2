"""Environment for a pipeline subprocess in a throwaway project: this venv's tools first, the
project's own code on the path, and DVC and Prefect state kept inside the project."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from bbam.data.records import Dataset
from bbam.data.synthetic import SyntheticConfig, generate_synthetic
from bbam.data.voc import read_voc
from bbam.data.writers import write_coco_json

REPO = Path(__file__).resolve().parents[2]
CATEGORIES = ["kiwi", "lemon", "mango", "plum"]
CATEGORY_IDS = [3, 17, 40, 41]
CUSTOM_DATA = SyntheticConfig(num_train=10, num_val=5, image_size=(64, 96), seed=3)


def project_env(project: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(project / ".dvc-site-cache"),
        BBAM_PREFECT_HOME=str(project / ".prefect"),
        PYTHONPATH=str(project),
        OMP_NUM_THREADS="1",
    )
    env.pop("PREFECT_HOME", None)
    env.pop("PREFECT_API_URL", None)
    return env


def custom_data_params(num_shards: int, chunk_size: int, iterations: int) -> dict:
    """The repo's params.yaml for a tiny custom COCO dataset under mydata/, set so that every
    stage runs in seconds: the detector keeps its random initialisation (lr 0) and the IoU
    cascade [0.0] still finds positives; the segmenters run 2 iterations."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["torch_threads"] = 1
    params["data"] = {
        "name": "custom",
        "root": "mydata",
        "archives_dir": None,
        "train_json": "mydata/annotations/instances_train.json",
        "train_images": "mydata/images/train",
        "val_json": "mydata/annotations/instances_val.json",
        "val_images": "mydata/images/val",
    }
    params["detector"].update(
        epochs=1,
        min_size=64,
        max_size=96,
        lr=0.0,
        warmup_iters=1,
        lr_steps=[1],
        batch_size=4,
        weights=None,  # its own classes; the demo's pretrained weights have the demo's
    )
    params["attribution"].update(
        num_shards=num_shards,
        chunk_size=chunk_size,
        overrides={
            "iou_thresholds": [0.0],
            "iterations": iterations,
            "early_stop": False,
            "num_jitters": 32,
            "positives_per_iter": 4,
        },
    )
    params["segmenters"] = {
        "supervisions": ["full", "bbam"],
        "instance": {"epochs": 1, "min_size": 64, "max_size": 96, "max_iters_per_epoch": 2},
        "semantic": {"epochs": 1, "max_iters_per_epoch": 2},
    }
    params["evaluate"] = {"report_samples": 2}
    return params


def write_custom_coco(
    root: Path,
    config: SyntheticConfig = CUSTOM_DATA,
    category_ids: list[int] | None = CATEGORY_IDS,
) -> None:
    """A small COCO dataset with its own category names (and, by default, its own ids)."""
    generate_synthetic(root / "gen", config)
    for split in ("train", "val"):
        ds = read_voc(root / "gen", split, classes=["ring", "star", "crescent", "cross"])
        images = root / "images" / split
        images.mkdir(parents=True)
        for record in ds.records:
            target = images / record.path.name
            shutil.copy(record.path, target)
            record.path = target
        write_coco_json(
            root / "annotations" / f"instances_{split}.json",
            Dataset(CATEGORIES, ds.records),
            image_root=images,
            category_ids=category_ids,
        )
    shutil.rmtree(root / "gen")


def copy_code(
    path: Path, names: tuple[str, ...] = ("bbam", "flows", "tasks", "pretrained")
) -> None:
    """A copy, not a symlink: DVC hashes the code folders (and the committed pretrained
    weights, a dependency of train_detector) as stage dependencies."""
    for name in names:
        shutil.copytree(REPO / name, path / name, ignore=shutil.ignore_patterns("__pycache__"))


def make_project(path: Path, params: dict | None = None) -> Path:
    path.mkdir(parents=True)
    copy_code(path)
    shutil.copy(REPO / "dvc.yaml", path / "dvc.yaml")
    if not (path / "mydata").exists():
        write_custom_coco(path / "mydata")
    (path / "params.yaml").write_text(
        yaml.safe_dump(
            params or custom_data_params(num_shards=3, chunk_size=1, iterations=12), sort_keys=False
        )
    )
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=path, env=project_env(path), check=True)
    return path


def run_in(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        list(args),
        cwd=project,
        env=project_env(project),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


GIT_IDENTITY = {
    f"GIT_{who}_{what}": value
    for who in ("AUTHOR", "COMMITTER")
    for what, value in (("NAME", "t"), ("EMAIL", "t@example.com"))
}


def run_git_project(project: Path, *args: str) -> subprocess.CompletedProcess:
    """Run a command in a `git_checkout` (a git identity set for commits and experiments);
    fails the test with the command's output tail when it fails."""
    result = subprocess.run(
        list(args),
        cwd=project,
        env={**project_env(project), **GIT_IDENTITY},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{args}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result


def git_checkout(project: Path, params: dict | None = None) -> Path:
    """A project as a newcomer's clone holds it: the code, dvc.yaml, the repository's own
    .gitignore and params.yaml (``params`` when given), in git with DVC initialised, all
    committed. Files already in ``project`` (git-ignored data) stay."""
    project.mkdir(parents=True, exist_ok=True)
    copy_code(project, ("bbam", "flows", "tasks"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, project / name)
    if params is None:
        shutil.copy(REPO / "params.yaml", project / "params.yaml")
    else:
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_git_project(project, "git", "init", "-q")
    run_git_project(project, "dvc", "init", "-q")
    run_git_project(project, "git", "add", "-A")
    run_git_project(project, "git", "commit", "-q", "-m", "checkout")
    return project
