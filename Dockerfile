# GPU image for `dvc repro`. It cannot be built on the development machines (no Docker engine),
# so it is kept minimal and checked by reading. Build and run from the repository root:
#   docker build -t agecascade .
#   docker run --gpus all --rm --shm-size=8g -v "$PWD":/workspace agecascade dvc repro
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common git make \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/* \
 && git config --system --add safe.directory /workspace

RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Editable install at the path the checkout is mounted on at run time, so the mounted code
# (the code dvc.yaml tracks as a dependency) is the code that runs. Same pins as pyproject.toml.
WORKDIR /workspace
COPY pyproject.toml README.md ./
COPY src ./src
COPY pipelines ./pipelines
RUN pip install -e '.[faces]'

CMD ["dvc", "repro"]
