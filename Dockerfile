# Worker image of the `attribute-shard-gpu` deployment (prefect.yaml, bbam-gpu Kubernetes
# pool, deploy/k8s-gpu-job-template.json). Build and push (docs/scale_out.md):
#
#   make deploy-image BBAM_IMAGE=registry.example.com/bbam:$(git rev-parse --short HEAD)
#
# The flow run executes inside the checkout on the shared volume (BBAM_CHECKOUT, the
# pull step's working directory) and that checkout's code wins (PYTHONPATH); the image
# provides Python 3.11, CUDA-enabled torch and every dependency of pyproject.toml.
# tests/test_deploy.py checks the install steps below against pyproject.toml (no drift).

ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

# ---------------------------------------------------------------- build: venv with deps
FROM ${CUDA_IMAGE} AS build
# Wheels of torch==2.14.1 / torchvision==0.29.1 built for CUDA 13.0 (they bring their
# CUDA libraries as nvidia-* wheels; the base image supplies the driver interface).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
COPY --from=ghcr.io/astral-sh/uv:0.8.22 /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# pydensecrf2 is built from source: compilers only in this stage.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN uv python install 3.11 && uv venv --python 3.11 /opt/venv
RUN uv pip install --index-url ${TORCH_INDEX_URL} \
    "torch==2.14.1" \
    "torchvision==0.29.1"
# [project].dependencies of pyproject.toml, except torch/torchvision above.
RUN uv pip install \
    "numpy>=1.26,<3" \
    "pillow>=10" \
    "scipy>=1.11" \
    "pyyaml>=6" \
    "tqdm>=4.66" \
    "defusedxml>=0.7" \
    "pycocotools>=2.0.7" \
    "pyarrow>=15" \
    "pandas>=2.1" \
    "pydensecrf2>=1.1" \
    "opencv-python-headless>=4.8" \
    "scikit-image>=0.22" \
    "prefect==3.8.8" \
    "fastapi<0.155" \
    "pydantic>=2.7,<3" \
    "dvc==3.67.1"
# The project itself (its dependencies are all installed above).
COPY pyproject.toml README.md /src/
COPY bbam /src/bbam
COPY tasks /src/tasks
COPY flows /src/flows
RUN uv pip install --no-deps /src

# ---------------------------------------------------------------- runtime
FROM ${CUDA_IMAGE}
ARG BBAM_UID=1000
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
# ubuntu:24.04 ships a user `ubuntu` with uid 1000: replace it by `bbam`.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --create-home --uid ${BBAM_UID} --user-group --shell /bin/bash bbam \
    && mkdir -p /shared/bbam /home/bbam/.prefect \
    && chown -R bbam:bbam /shared /home/bbam/.prefect
# BBAM_CHECKOUT: the shared checkout (PVC mount, working directory, pull step);
# PREFECT_HOME: Prefect's local state, writable by the non-root user.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    BBAM_CHECKOUT=/shared/bbam \
    PREFECT_HOME=/home/bbam/.prefect \
    PYTHONPATH=/shared/bbam \
    PYTHONUNBUFFERED=1 \
    DVC_NO_ANALYTICS=1
USER ${BBAM_UID}:${BBAM_UID}
WORKDIR /shared/bbam
# The Kubernetes worker passes `prefect flow-run execute` as args; this is the same.
CMD ["prefect", "flow-run", "execute"]
