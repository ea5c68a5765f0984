# treepo image for compose.yaml: the project with vLLM (CUDA) and DeepSpeed; the same image runs the buffer,
# the actors and the learner (entry point `treepo`: compose passes `buffer|actor|learner --config ...`). GPUs come from the NVIDIA
# container toolkit at run time; torch 2.13.0 from PyPI is the CUDA build.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DS_BUILD_OPS=0 \
    TORCH_EXTENSIONS_DIR=/opt/torch-extensions

# a compiler for DeepSpeed's just-in-time ops; redis-server for runs without the compose Redis
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential ninja-build redis-server \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/treepo
COPY pyproject.toml constraints.txt README.md ./
COPY protocol ./protocol
COPY actors ./actors
COPY learner ./learner
COPY buffer ./buffer
COPY treepo ./treepo
RUN pip install -c constraints.txt ".[gpu]"

COPY configs ./configs
ENTRYPOINT ["treepo"]
CMD ["--help"]
