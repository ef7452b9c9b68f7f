# The job's image: this repository at /app, installed by the Makefile's own `make install` (one source of truth),
# into a virtualenv outside /app so that Ray's working_dir (/app) stays small. The image that infra/kuberay-rayjob.yaml
# and infra/cluster.yaml run:
#
#   docker build -t ghcr.io/example/tokendyn-pipeline:latest .                       # CPU
#   docker build -t ghcr.io/example/tokendyn-pipeline:cuda \
#       --build-arg TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" .   # CUDA
#
# CUDA wheels of torch carry their own CUDA runtime, so both variants share the base image; the nodes need only
# the NVIDIA driver (and the device plugin on Kubernetes).
FROM python:3.11-slim

ARG TORCH=torch==2.13.0
ENV VENV=/opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1

RUN apt-get update && apt-get install -y --no-install-recommends make curl && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY . /app
RUN make install VENV="$VENV" TORCH="$TORCH" PYTHON=python3 && rm -rf /root/.cache/pip

# KubeRay and the cluster launcher start Ray themselves and submit the job; run by hand it shows the job's flags.
CMD ["python", "jobs/compress_corpus.py", "--help"]
