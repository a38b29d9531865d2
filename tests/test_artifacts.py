"""Each stage's flow publishes its results as Prefect artifacts, read back here from a
real (loopback) Prefect API.

The stage flows run for real in a temporary working directory; only their expensive
tasks are replaced by stand-ins returning fabricated results (the attribution shards write
real manifest parts). The tables read back from the API must hold the numbers the stage
wrote to ``metrics/*.json`` (or, for attribution, the merged manifest's counts per shard).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from loopback_prefect import prefect_server
from prefect import task

import flows.attribute as attribute_module
import flows.evaluate as evaluate_module
import flows.prepare_data as prepare_module
import flows.pseudo_labels as pseudo_module
import flows.train_detector as detector_module
import flows.train_segmenters as segmenters_module
import tasks.attribution as attribution_tasks
from bbam import __version__
from bbam.data.records import Dataset, ImageRecord, Instance
from bbam.manifest import write_part
from tasks.attribution_config import shard_dir


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A loopback server for the module; this process's flows and client talk to it."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_LOGGING_TO_API_ENABLED,
        temporary_settings,
    )

    # A generous start-up limit: a fresh database migrates first, slow on a busy host.
    with prefect_server(tmp_path_factory.mktemp("prefect"), timeout_s=600) as env:
        # No run logs to the API: the last would be sent after the server is gone.
        settings = {PREFECT_API_URL: env["PREFECT_API_URL"], PREFECT_LOGGING_TO_API_ENABLED: False}
        with temporary_settings(settings):
            yield env["PREFECT_API_URL"]


@pytest.fixture
def workdir(prefect_api, tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the stages write metrics/, runs/, reports/ relative to it
    return tmp_path


def read_artifacts(artifact_filter, limit: int = 100) -> list:
    """Artifacts matching ``artifact_filter``, newest first, from the API (POST
    /artifacts/filter). Not ``client.read_artifacts``: in prefect 3.8.8 it sends the filters
    left out as null (422), and an empty task-run filter keeps only task runs' artifacts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import Artifact

    body = {
        "artifacts": artifact_filter.model_dump(mode="json", exclude_unset=True),
        "sort": "CREATED_DESC",
        "limit": limit,
        "offset": 0,
    }
    with get_client(sync_client=True) as client:
        response = client.request("POST", "/artifacts/filter", json=body)
    response.raise_for_status()
    return Artifact.model_validate_list(response.json())


def artifacts_of(state) -> dict:
    """The artifacts of one flow run, by key."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    found = read_artifacts(ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in found}


def table(artifact) -> list[dict]:
    assert artifact.type == "table"
    return json.loads(artifact.data)


def metrics_file(name: str) -> dict:
    return json.loads(Path("metrics", f"{name}.json").read_text())


def test_prepare_data_publishes_the_split_counts(workdir, monkeypatch):
    summary = {
        "train": {"images": 10, "instances": 23, "skipped": {"unreadable": 2, "crowd": 1}},
        "val": {"images": 5, "instances": 9, "skipped": {}, "repaired": {"box": 4}},
    }

    class Prepare:
        def with_options(self, **_):
            return lambda params: None

    monkeypatch.setattr(prepare_module, "cached_in_data_root", lambda params: {})
    monkeypatch.setattr(prepare_module, "prepare", Prepare())
    monkeypatch.setattr(prepare_module, "summarise", lambda params: summary)
    state = prepare_module.prepare_data(
        params={"data": {"name": "custom", "max_unreadable_train": 1.0}}, return_state=True
    )
    assert state.is_completed(), state
    written = metrics_file("data")
    rows = table(artifacts_of(state)["bbam-data"])
    assert rows == [
        {"split": "train", "images": 10, "instances": 23, "skipped": 3, "repaired": 0},
        {"split": "val", "images": 5, "instances": 9, "skipped": 0, "repaired": 4},
    ]
    assert [r["instances"] for r in rows] == [written[s]["instances"] for s in ("train", "val")]


def test_train_detector_publishes_box_ap(workdir, monkeypatch):
    metrics = {
        "box_ap": 0.2512,
        "box_ap50": 0.4875,
        "box_ap75": 0.1999,
        "train_seconds": 12.5,
        "epochs": 3,
        "num_train_images": 10,
        "num_val_images": 5,
        "device": "cpu",
        "params_hash": "abc",
    }
    monkeypatch.setattr(detector_module, "train", lambda params: dict(metrics))
    state = detector_module.train_detector_flow(params={}, return_state=True)
    assert state.is_completed(), state
    written = metrics_file("detector")
    values = {r["metric"]: r["value"] for r in table(artifacts_of(state)["bbam-detector-metrics"])}
    assert values["box AP50 (val, %)"] == round(100 * written["box_ap50"], 2) == 48.75
    assert values["box AP (val, %)"] == 25.12
    assert values["box AP75 (val, %)"] == 19.99
    assert values["epochs"] == 3 and values["train images"] == 10 and values["device"] == "cpu"


# Per shard: the statuses its fake task writes (shard 2 has nothing to do).
SHARD_STATUSES = {
    0: ["ok", "ok", "no_positive"],
    1: ["ok", "failed", "skipped", "no_positive", "no_positive"],
    2: [],
}


@task
def fake_attribute_shard(params: dict, shard: int, out_dir: str, params_hash: str) -> dict:
    statuses = SHARD_STATUSES[shard]
    if statuses:
        current = {"params_hash": params_hash, "code_version": __version__}  # merged: current
        rows = [
            {"key": f"img{shard}/{i}", "image_id": f"img{shard}", "shard": shard, "status": s}
            | current
            for i, s in enumerate(statuses)
        ]
        write_part(shard_dir(out_dir, shard), rows, [None] * len(rows))
    failed = statuses.count("failed")
    return {"planned": len(statuses), "ran": len(statuses), "skipped_done": 0, "failed": failed}


def fake_split(params: dict) -> Dataset:
    """The planned instances: the merge keeps rows of these only."""
    records = [
        ImageRecord(
            f"img{s}",
            Path(f"img{s}.png"),
            8,
            8,
            [Instance(i, 1, [0, 0, 1, 1]) for i in range(len(st))],
        )
        for s, st in SHARD_STATUSES.items()
    ]
    return Dataset(["a"], records)


def test_attribute_publishes_counts_per_shard_even_when_it_fails(workdir, monkeypatch):
    monkeypatch.setattr(attribute_module, "attribute_shard", fake_attribute_shard)
    monkeypatch.setattr(attribution_tasks, "attribution_split", fake_split)
    monkeypatch.setattr(attribution_tasks, "found_unreadable", lambda dataset: {})
    monkeypatch.setattr(attribute_module, "attribution_hash", lambda params: "h")
    params = {"attribution": {"num_shards": 3, "max_failure_fraction": 0.0}}
    state = attribute_module.attribute_flow(params=params, executor="local", return_state=True)
    assert state.is_failed(), "one failed instance exceeds max_failure_fraction 0"
    written = metrics_file("attribution")
    rows = table(artifacts_of(state)["bbam-attribution-shards"])
    assert rows == [
        {"shard": 0, "instances": 3, "ok": 2, "no_positive": 1, "failed": 0, "skipped": 0},
        {"shard": 1, "instances": 5, "ok": 1, "no_positive": 2, "failed": 1, "skipped": 1},
        {"shard": 2, "instances": 0, "ok": 0, "no_positive": 0, "failed": 0, "skipped": 0},
        {"shard": "all", "instances": 8, "ok": 3, "no_positive": 3, "failed": 1, "skipped": 1},
    ]
    total = rows[-1]
    assert {k: written[k] for k in ("instances", "ok", "no_positive", "failed", "skipped")} == {
        k: total[k] for k in ("instances", "ok", "no_positive", "failed", "skipped")
    }


def test_pseudo_labels_publish_quality_beside_the_baselines(workdir, monkeypatch):
    summary = {
        "images": 10,
        "instances": 21,
        "crowd_regions": 0,
        "image_errors": [],
        "mean_instance_iou_vs_gt": 71.35,
        "mean_instance_iou_grabcut": 62.4,
        "mean_instance_iou_box": 55.02,
        "empty_fg": 1,
        "fallbacks": {"none": 20, "box": 1},
        "attribution_status": {"ok": 20, "no_positive": 1},
        "mcg_used": 0,
    }
    monkeypatch.setattr(pseudo_module, "make_pseudo_labels", lambda *args: dict(summary))
    params = {"attribution": {"max_failure_fraction": 0.05}}
    state = pseudo_module.pseudo_labels_flow(params=params, return_state=True)
    assert state.is_completed(), state
    written = metrics_file("pseudo_labels")
    artifact = artifacts_of(state)["bbam-pseudo-label-quality"]
    iou = {r["masks"]: r["mean instance IoU vs GT (%)"] for r in table(artifact)}
    assert iou == {
        "bbam": written["mean_instance_iou_vs_gt"],
        "grabcut (baseline)": written["mean_instance_iou_grabcut"],
        "filled box (baseline)": written["mean_instance_iou_box"],
    }
    assert iou["bbam"] == 71.35 and iou["filled box (baseline)"] == 55.02
    assert {r["instances"] for r in table(artifact)} == {21}


def test_train_segmenters_publish_the_last_training_step(workdir, monkeypatch):
    losses = {"instance_full": 1.25, "semantic_full": 0.5, "instance_bbam": 2.0}

    def train(params: dict, kind: str, supervision: str) -> str:
        out = Path("runs/segmenters") / f"{kind}_{supervision}"
        out.mkdir(parents=True)
        last = losses.get(f"{kind}_{supervision}", 0.75)
        log = [
            {"event": "restart", "reason": "no checkpoint"},
            {"epoch": 0, "iter": 0, "loss": 9.0},
            {"epoch": 1, "iter": 1, "loss": last},
        ]
        (out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        return str(out / "model.pt")

    monkeypatch.setattr(segmenters_module, "train_segmenter", train)
    params = {"segmenters": {"supervisions": ["full", "bbam"]}}
    state = segmenters_module.train_segmenters_flow(params=params, return_state=True)
    assert state.is_completed(), state
    rows = table(artifacts_of(state)["bbam-segmenter-training"])
    got = {(r["model"], r["supervision"]): (r["epochs"], r["last logged loss"]) for r in rows}
    assert got == {
        ("Mask R-CNN", "full"): (2, 1.25),
        ("DeepLabV3", "full"): (2, 0.5),
        ("Mask R-CNN", "bbam"): (2, 2.0),
        ("DeepLabV3", "bbam"): (2, 0.75),
    }


def test_evaluate_publishes_scores_and_a_link_to_the_report(workdir, monkeypatch):
    scores = {  # per supervision: semantic mIoU, VOC AP50 (fractions, as the tasks return)
        "full": (0.6, 0.7),
        "bbam": (0.45, 0.5),
    }

    def semantic(params, supervision):
        return {"miou": scores[supervision][0]}

    def instance(params, supervision):
        voc = {"ap25": 0.8, "ap50": scores[supervision][1], "ap70": 0.3, "ap75": 0.2, "abo": 0.55}
        return {"voc": voc, "coco": {}, "images": 5, "images_without_gt_mask": 1}

    def report(out_dir, metrics, samples, **extras):
        path = Path(out_dir) / "index.html"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("<html></html>")
        return path

    monkeypatch.setattr(evaluate_module, "evaluate_semantic", semantic)
    monkeypatch.setattr(evaluate_module, "evaluate_instance", instance)
    monkeypatch.setattr(
        evaluate_module,
        "evaluate_pseudo_labels",
        lambda params: {"pseudo_mean_instance_iou": 0.7123, "pseudo_sem_miou": 0.65, "images": 4},
    )
    monkeypatch.setattr(evaluate_module, "report_samples", lambda params, n: [])
    monkeypatch.setattr(evaluate_module, "report_extras", lambda *args: {})
    monkeypatch.setattr(evaluate_module, "write_report", report)
    params = {"segmenters": {"supervisions": ["full", "bbam"]}, "evaluate": {}}
    state = evaluate_module.evaluate_flow(params=params, return_state=True)
    assert state.is_completed(), state
    written = metrics_file("evaluation")
    artifacts = artifacts_of(state)

    rows = {r["supervision"]: r for r in table(artifacts["bbam-segmenter-metrics"])}
    assert rows["bbam"]["semantic mIoU (%)"] == written["bbam"]["sem_miou"] == 45.0
    assert rows["full"]["instance AP50 (%)"] == written["full"]["ins_ap50"] == 70.0
    assert rows["full"]["val images without GT mask"] == 1

    markdown = artifacts["bbam-report"]
    assert markdown.type == "markdown"
    report = (workdir / "reports/index.html").resolve()
    assert f"({report.as_uri()})" in markdown.data
    for name, value in written["table"].items():
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        assert f"| {name} | {shown} |" in markdown.data
    assert "| pseudo-label mean instance IoU vs GT (%) | 71.23 |" in markdown.data
    assert "| semantic bbam/full (%)  [paper 96.7] | 75.00 |" in markdown.data  # 45 / 60


def test_latest_report_is_found_by_its_key(workdir, monkeypatch):
    """The Artifacts page lists an artifact by key: the newest version is the last run's."""
    from prefect import flow
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    @flow
    def publish(value: float) -> None:
        evaluate_module.publish_results({}, {"semantic mIoU bbam (%)": value}, Path("r.html"))

    publish(1.5)
    publish(2.5)
    found = read_artifacts(ArtifactFilter(key=ArtifactFilterKey(any_=["bbam-report"])), limit=1)
    assert "| semantic mIoU bbam (%) | 2.50 |" in found[0].data


def test_training_table_names_the_configured_semantic_head():
    names = segmenters_module.network_names
    assert names({"segmenters": {}})["semantic"] == "DeepLabV3"
    assert names({"segmenters": {"semantic": {"head": "fpn"}}}) == {
        "instance": "Mask R-CNN",
        "semantic": "semantic FPN",
    }
