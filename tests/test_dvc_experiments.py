"""Your own data without editing params.yaml (README, "Bring your own COCO dataset"):
`dvc exp run -S data.name=custom -S data.train_json=...` in a git checkout, then
`dvc exp show` comparing two such runs. Only the first stage (prepare_data) runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.project_env import CATEGORIES, git_checkout, run_git_project, write_custom_coco

from bbam.data.synthetic import SyntheticConfig

pytestmark = pytest.mark.slow

DATA = "data/mine"  # git-ignored (/data/), as a user's images would be


def _write_coco(root: Path) -> None:
    """A small COCO set with its own category names; plus a 2-image subset of train."""
    config = SyntheticConfig(num_train=4, num_val=2, image_size=(48, 64), seed=1)
    write_custom_coco(root, config, category_ids=None)
    coco = json.loads((root / "annotations/instances_train.json").read_text())
    keep = {image["id"] for image in coco["images"][:2]}
    coco["images"] = [i for i in coco["images"] if i["id"] in keep]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    (root / "annotations/instances_train_small.json").write_text(json.dumps(coco))


def _experiments(project: Path) -> dict[str, dict]:
    """`dvc exp show --json` -> {experiment name: its data (params, metrics)}."""
    shown = json.loads(run_git_project(project, "dvc", "exp", "show", "--json").stdout)
    found = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment["revs"]:
                found[rev["name"]] = rev["data"]
    return found


def test_exp_run_with_custom_data_and_exp_show_compares_runs(tmp_path: Path) -> None:
    project = tmp_path / "checkout"
    project.mkdir()
    _write_coco(project / DATA)
    git_checkout(project)
    committed_params = (project / "params.yaml").read_text()

    # The README's command, one -S per key that differs from the synthetic default.
    common = [
        "-S", "data.name=custom",
        "-S", f"data.root={DATA}",
        "-S", f"data.train_images={DATA}/images/train",
        "-S", f"data.val_json={DATA}/annotations/instances_val.json",
        "-S", f"data.val_images={DATA}/images/val",
        "-S", "proposals.source=superpixel",
    ]  # fmt: skip
    for name, train_json in (
        ("all-train", f"{DATA}/annotations/instances_train.json"),
        ("two-train", f"{DATA}/annotations/instances_train_small.json"),
    ):
        run_git_project(
            project, "dvc", "exp", "run", "-n", name, "prepare_data",
            *common, "-S", f"data.train_json={train_json}",
        )  # fmt: skip

    # params.yaml as committed was never edited by hand: the experiments carry the values.
    head = run_git_project(project, "git", "show", "HEAD:params.yaml").stdout
    assert head == committed_params
    experiments = _experiments(project)
    assert {"all-train", "two-train"} <= set(experiments)
    for name, images, train_json in (
        ("all-train", 4, "instances_train.json"),
        ("two-train", 2, "instances_train_small.json"),
    ):
        data = experiments[name]
        params = data["params"]["params.yaml"]["data"]["data"]
        assert params["name"] == "custom" and params["train_json"].endswith(train_json)
        # metrics/data.json is committed with each experiment (metrics/ is not git-ignored)
        metrics = data["metrics"]["metrics/data.json"]["data"]
        assert metrics["train"]["images"] == images, (name, metrics)
        assert metrics["val"]["images"] == 2
        assert set(metrics["train"]["instances_per_class"]) == set(CATEGORIES)
    # The table a person reads: both runs, the changed param and the metric side by side.
    table = run_git_project(
        project, "dvc", "exp", "show", "--md", "--only-changed", "--keep", "data.train_json",
        "--drop", "Created",
    ).stdout  # fmt: skip
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if "[" in line}
    assert any("all-train" in key for key in rows) and any("two-train" in key for key in rows)
    assert "train.images" in table and "data.train_json" in table
    diff = run_git_project(project, "dvc", "exp", "diff", "all-train", "two-train", "--json").stdout
    assert json.loads(diff)["metrics"]["metrics/data.json"]["train.images"] == {
        "old": 4,
        "new": 2,
        "diff": -2,
    }
