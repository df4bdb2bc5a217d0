# syntax=docker/dockerfile:1
# Two targets, built by Docker (BuildKit), Podman and Buildah alike (see `make image`):
#   pipeline (the default)  dvc repro on a mounted checkout, with the auto-sklearn env
#   serve                   mlflow models serve for a registered model, on port 8080
# torch's CUDA 13 runtime, cuDNN and NCCL come as pip packages with its wheel, so the base is a
# plain Debian bookworm (Python 3.11); the host needs only the NVIDIA driver and the container
# toolkit (`--gpus all`). The README says why, with sizes and build times.
ARG BASE=docker.io/library/debian:bookworm-slim

# An empty wheelhouse unless the build names one: `--build-context wheels=DIR` plus pip's own
# settings as build args, e.g. --build-arg PIP_FIND_LINKS=/wheels --build-arg PIP_NO_INDEX=1.
FROM scratch AS wheels

FROM ${BASE} AS system
ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version'
# Any user may run the image (`--user "$(id -u):$(id -g)"`); caches go to a HOME all can write.
RUN useradd --create-home --uid 1000 --shell /bin/bash agecascade \
 && chmod 1777 /home/agecascade
ENV HOME=/home/agecascade

# The dependency layers: pins only, no code, so a code change never reinstalls torch.
# PIP_CERT points at the build secret `ca` when one is given (a TLS-intercepting network):
# it is mounted for this step only and never written into a layer.
FROM system AS serve-deps
ARG PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_NO_INDEX
COPY requirements/base.txt requirements/faces.txt /tmp/requirements/
RUN --mount=type=secret,id=ca --mount=type=bind,from=wheels,target=/wheels \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install 'setuptools>=69' -r /tmp/requirements/base.txt \
    -r /tmp/requirements/faces.txt
ENV PATH=/opt/venv/bin:$PATH

FROM serve-deps AS pipeline-deps
ARG PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_NO_INDEX
# git and make for dvc and the Makefile; Python 3.9 for auto-sklearn 0.15 (scikit-learn 0.24 has
# no wheels past 3.9) from Debian bullseye. Its distutils ships in bullseye's python3-distutils,
# whose package depends on bullseye's python3, so only its files are unpacked.
RUN echo 'deb http://deb.debian.org/debian bullseye main' > /etc/apt/sources.list.d/bullseye.list \
 && apt-get update \
 && apt-get install -y --no-install-recommends git make python3.9 \
 && cd /tmp && apt-get download python3-distutils/bullseye \
 && dpkg-deb -x python3-distutils_*.deb / && rm python3-distutils_*.deb \
 && rm -rf /var/lib/apt/lists/* /etc/apt/sources.list.d/bullseye.list \
 && git config --system --add safe.directory '*'
COPY requirements/ /tmp/requirements/
RUN --mount=type=secret,id=ca --mount=type=bind,from=wheels,target=/wheels \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && pip install -r /tmp/requirements/onnx.txt -r /tmp/requirements/dev.txt \
 && pip install --no-deps -r /tmp/requirements/no-deps.txt
# automl_env builds the env; it needs only these files of the package (stdlib otherwise), so
# only a change to them rebuilds this layer.
COPY src/agecascade/__init__.py src/agecascade/errors.py /tmp/automl/agecascade/
COPY src/agecascade/features/__init__.py src/agecascade/features/automl_env.py \
     /tmp/automl/agecascade/features/
RUN --mount=type=secret,id=ca --mount=type=bind,from=wheels,target=/wheels \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && AGECASCADE_AUTOSKLEARN_PYTHON=/usr/bin/python3.9 PYTHONPATH=/tmp/automl \
    python -m agecascade.features.automl_env --path /opt/autosklearn \
 && test -f /opt/autosklearn/agecascade-autosklearn.json \
 && rm -rf /tmp/automl
ENV AGECASCADE_AUTOSKLEARN_ENV=/opt/autosklearn

# serve: the model URI is given at run time; the tracking store is mounted at /mlflow.
FROM serve-deps AS serve
COPY --chown=agecascade pyproject.toml README.md /opt/agecascade/
COPY --chown=agecascade requirements /opt/agecascade/requirements
COPY --chown=agecascade src /opt/agecascade/src
COPY --chown=agecascade pipelines /opt/agecascade/pipelines
RUN pip install --no-deps --no-build-isolation /opt/agecascade
USER agecascade
WORKDIR /mlflow
ENV MODEL_URI=models:/age-estimator@champion MLFLOW_TRACKING_URI=sqlite:////mlflow/mlflow.db
ENV PORT=8080
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD curl -fsS "http://127.0.0.1:${PORT}/ping" || exit 1
CMD ["sh", "-c", "exec mlflow models serve -m \"$MODEL_URI\" --env-manager local --host 0.0.0.0 --port \"$PORT\""]

# pipeline: installed editable at /workspace, where the checkout is mounted at run time, so the
# code that runs is the code dvc.yaml hashes. Without a mount, the image's own copy runs.
FROM pipeline-deps AS pipeline
WORKDIR /workspace
COPY --chown=agecascade . /workspace
RUN pip install --no-deps --no-build-isolation -e /workspace
USER agecascade
CMD ["dvc", "repro"]
