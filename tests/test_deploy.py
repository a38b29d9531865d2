"""GPU cluster deployment without a cluster: the worker image recipe (Dockerfile) against
pyproject.toml, the Kubernetes work pool template (deploy/k8s-gpu-job-template.json)
rendered into a Job manifest by prefect-kubernetes' own code with the
`attribute-shard-gpu` deployment's job variables, and (slow) the pool, the `gpu` limit
and the deployment created by deploy/deploy.sh on a loopback Prefect server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import pytest
import yaml
from loopback_prefect import BIN, prefect_server
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "deploy" / "k8s-gpu-job-template.json"
SCRIPT = ROOT / "deploy" / "deploy.sh"
IMAGE = "registry.example.com/bbam:test"
CHECKOUT = "/shared/bbam"
IMAGE_PREFECT_HOME = "/home/bbam/.prefect"


# ---------------------------------------------------------------- Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a continued line"
    return instructions


def pip_installs(instructions: list[tuple[str, str]]) -> list[tuple[list[str], list[str]]]:
    """Every `pip install` / `uv pip install` in a RUN step: (options, positional args)."""
    found = []
    for keyword, rest in instructions:
        if keyword != "RUN":
            continue
        for command in re.split(r"&&|;", rest):
            words = shlex.split(command)
            for start in range(len(words) - 1):
                if words[start : start + 2] == ["pip", "install"]:
                    break
            else:
                continue
            options, positional = [], []
            args = iter(words[start + 2 :])
            for word in args:
                if word in ("--index-url", "--extra-index-url", "-i", "--python", "-c", "-r"):
                    options.append(f"{word}={next(args)}")
                elif word.startswith("-"):
                    options.append(word)
                else:
                    positional.append(word)
            found.append((options, positional))
    return found


def _normalized(requirements) -> set[str]:
    out = set()
    for text in requirements:
        req = Requirement(text)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        out.add(f"{name}{''.join(sorted(str(s) for s in req.specifier))}")
    return out


def test_dockerfile_installs_exactly_the_pyproject_dependencies() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installs = pip_installs(dockerfile_instructions((ROOT / "Dockerfile").read_text()))
    requirements, projects = [], []
    for options, positional in installs:
        if any(arg.startswith("/") or arg == "." for arg in positional):
            projects.append((options, positional))
        else:
            requirements.extend(positional)
    assert _normalized(requirements) == _normalized(pyproject["dependencies"]), (
        "Dockerfile's pip installs drifted from pyproject.toml [project].dependencies"
    )
    assert len(requirements) == len(pyproject["dependencies"]), "a requirement is installed twice"
    # The project itself goes in without resolving anything else (nothing beyond the list).
    assert len(projects) == 1 and "--no-deps" in projects[0][0], projects
    # torch/torchvision come from the CUDA wheel index, in their own step.
    torch_step = [o for o, p in installs if any(r.startswith("torch") for r in p)]
    assert len(torch_step) == 1 and any(o.startswith("--index-url=") for o in torch_step[0])


def test_dockerfile_runtime_is_cuda_python311_non_root() -> None:
    instructions = dockerfile_instructions((ROOT / "Dockerfile").read_text())
    args = dict(
        rest.split("=", 1) for keyword, rest in instructions if keyword == "ARG" and "=" in rest
    )
    bases = [rest.split()[0] for keyword, rest in instructions if keyword == "FROM"]
    assert bases and all(base == "${CUDA_IMAGE}" for base in bases)
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", args["CUDA_IMAGE"])
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert "uv python install 3.11" in runs and "uv venv --python 3.11" in runs
    # the last stage: non-root user, documented env, working directory = checkout
    last = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    final = instructions[last:]
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert users[-1] == "${BBAM_UID}:${BBAM_UID}" and args["BBAM_UID"] != "0"
    env = {}
    for keyword, rest in final:
        if keyword == "ENV":
            env.update(word.split("=", 1) for word in shlex.split(rest))
    assert env["BBAM_CHECKOUT"] == CHECKOUT and env["PYTHONPATH"] == CHECKOUT
    assert env["PREFECT_HOME"] == IMAGE_PREFECT_HOME
    assert ("WORKDIR", CHECKOUT) in final
    # The build context is an allow-list: everything ignored but what the COPY steps take.
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    allowed = {p.lstrip("!").rstrip("/") for p in patterns if p.startswith("!")}
    copied = {
        source
        for keyword, rest in instructions
        if keyword == "COPY" and not rest.startswith("--from")
        for source in rest.split()[:-1]
    }
    assert copied == allowed == {"pyproject.toml", "README.md", "bbam", "tasks", "flows"}


# ---------------------------------------------------------------- job template


def gpu_deployment() -> dict:
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return next(d for d in config["deployments"] if d["name"] == "attribute-shard-gpu")


def resolved_job_variables() -> dict:
    """The deployment's job variables as `prefect deploy` stores them ({{ $VAR }} from the
    environment, the same call prefect.cli.deploy makes)."""
    from prefect.utilities.templating import apply_values

    return apply_values(gpu_deployment()["work_pool"]["job_variables"], os.environ, False)


K8S = "prefect-kubernetes (the dev extra) renders the Kubernetes worker's Job manifest"


def render_job_manifest(template: dict, job_variables: dict) -> dict:
    """The worker's own path from pool template + deployment job variables to the Job it
    submits: KubernetesWorkerJobConfiguration.resolve_for_flow_run (from_template_and_values,
    then prepare_for_flow_run), with a client stub answering its two reads."""
    from prefect.client.schemas.objects import Flow, FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse

    worker = pytest.importorskip("prefect_kubernetes.worker", reason=K8S)

    flow = Flow(id=uuid.uuid4(), name="attribute-shard")
    deployment = DeploymentResponse(
        id=uuid.uuid4(), name="attribute-shard-gpu", flow_id=flow.id, job_variables=job_variables
    )
    flow_run = FlowRun(
        id=uuid.uuid4(),
        name="shard-0003",
        flow_id=flow.id,
        deployment_id=deployment.id,
        parameters={"shard": 3},
    )

    class Client:
        async def read_deployment(self, deployment_id):
            assert deployment_id == deployment.id
            return deployment

        async def read_flow(self, flow_id):
            return flow

    pool = WorkPool(name="bbam-gpu", type="kubernetes", base_job_template=template)
    configuration = asyncio.run(
        worker.KubernetesWorkerJobConfiguration.resolve_for_flow_run(
            flow_run, client=Client(), work_pool=pool, worker_name="k8s-worker"
        )
    )
    return configuration.job_manifest


def check_gpu_job(manifest: dict, image: str = IMAGE) -> dict[str, str]:
    """The assertions a GPU shard job must pass; returns the container's env."""
    assert manifest["kind"] == "Job" and manifest["spec"]["backoffLimit"] == 0
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == image
    assert container["args"] == ["prefect", "flow-run", "execute"]
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"]["nvidia.com/gpu"] == 1
    assert resources["requests"]["cpu"] == "4" and resources["requests"]["memory"] == "16Gi"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["shared"]["persistentVolumeClaim"] == {"claimName": "bbam-shared"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["shared"] == CHECKOUT == container["workingDir"]
    assert mounts["dshm"] == "/dev/shm" and volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert container["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["fsGroup"] == container["securityContext"]["runAsUser"] == 1000
    assert pod["restartPolicy"] == "Never"
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names)), names
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["BBAM_CHECKOUT"] == CHECKOUT  # the pull step's set_working_directory
    assert env["OMP_NUM_THREADS"] == "4"
    assert env["PREFECT_HOME"] == IMAGE_PREFECT_HOME  # not the worker's
    assert "PREFECT__FLOW_RUN_ID" in env
    return env


def test_template_renders_the_gpu_job_the_worker_submits(monkeypatch, tmp_path) -> None:
    from prefect.settings import PREFECT_HOME, temporary_settings

    monkeypatch.setenv("BBAM_IMAGE", IMAGE)
    template = json.loads(TEMPLATE.read_text())
    # The worker's own PREFECT_HOME differs from the image's: the job must keep the image's.
    with temporary_settings({PREFECT_HOME: tmp_path / "worker-home"}):
        manifest = render_job_manifest(template, resolved_job_variables())
    check_gpu_job(manifest)
    # gpu_count is a job variable: a deployment (or a run) asking for 2 gets 2.
    two = render_job_manifest(template, {**resolved_job_variables(), "gpu_count": 2})
    container = two["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2


def test_template_variables_are_all_used_and_documented() -> None:
    """A variable takes effect only if job_configuration references it: none is dead."""
    template = json.loads(TEMPLATE.read_text())
    text = json.dumps(template["job_configuration"])
    for name, schema in template["variables"]["properties"].items():
        assert "{{ " + name + " }}" in text, f"variable {name} is never used"
        assert schema.get("title") or schema.get("description"), name
    job_variables = gpu_deployment()["work_pool"]["job_variables"]
    assert set(job_variables) <= set(template["variables"]["properties"])
    assert job_variables["env"]["BBAM_CHECKOUT"] == CHECKOUT
    assert template["variables"]["properties"]["checkout_path"]["default"] == CHECKOUT


def test_deploy_script_refuses_without_its_environment() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "BBAM_IMAGE")}
    usage = subprocess.run([str(SCRIPT)], capture_output=True, text=True, env=env)
    assert usage.returncode == 2 and "deploy.sh pools" in usage.stderr
    missing = subprocess.run([str(SCRIPT), "image"], capture_output=True, text=True, env=env)
    assert missing.returncode == 2 and "set BBAM_IMAGE" in missing.stderr


# ---------------------------------------------------------------- slow: loopback server


GET_POOL_AND_RENDER = """
import asyncio, json, sys
from prefect.client.orchestration import get_client
from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

async def main():
    async with get_client() as client:
        pool = await client.read_work_pool("bbam-gpu")
        limit = await client.read_global_concurrency_limit_by_name("gpu")
        deployment = await client.read_deployment_by_name("attribute-shard/attribute-shard-gpu")
        run = await client.create_flow_run_from_deployment(
            deployment.id, parameters={"shard": 0, "params_hash": "h", "attempt": 1}
        )
        configuration = await KubernetesWorkerJobConfiguration.resolve_for_flow_run(
            run, client=client, work_pool=pool, worker_name="k8s-worker"
        )
    json.dump({"template": pool.base_job_template, "type": pool.type, "limit": limit.limit,
               "manifest": configuration.job_manifest}, sys.stdout)

asyncio.run(main())
"""


@pytest.mark.slow
def test_pools_and_gpu_deployment_on_a_loopback_server(tmp_path: Path) -> None:
    pytest.importorskip("prefect_kubernetes", reason=K8S)
    with prefect_server(tmp_path) as env:
        env = {**env, "PREFECT": str(BIN / "prefect"), "BBAM_GPU_LIMIT": "3"}
        env.update(BBAM_IMAGE=IMAGE, BBAM_CHECKOUT=str(ROOT), PYTHONPATH=str(ROOT))
        pools = subprocess.run(
            [str(SCRIPT), "pools"], env=env, capture_output=True, text=True, timeout=300
        )
        assert pools.returncode == 0, pools.stdout + pools.stderr
        deploy = subprocess.run(
            [str(SCRIPT), "deployments", "--name", "attribute-shard-gpu"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert deploy.returncode == 0, (deploy.stdout + deploy.stderr)[-3000:]
        read = subprocess.run(
            [sys.executable, "-c", GET_POOL_AND_RENDER],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert read.returncode == 0, read.stderr[-3000:]
    result = json.loads(read.stdout)
    # The server validated and stored the template file as it is.
    assert result["type"] == "kubernetes" and result["limit"] == 3
    assert result["template"] == json.loads(TEMPLATE.read_text())
    job_env = check_gpu_job(result["manifest"])
    assert job_env["PREFECT_API_URL"] == env["PREFECT_API_URL"]
