#!/usr/bin/env bash
# Check the house's floors (the import-linter contracts in pyproject.toml) on the package as installed:
# the repository maps its top-level folders under `mugcp.`, so the contracts are read off a
# non-editable install of this checkout in a temporary folder. Exit status is lint-imports'.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python -m pip install -q --no-deps --no-build-isolation --disable-pip-version-check --target "$tmp/site" "$repo"
cd "$tmp" && PYTHONPATH="$tmp/site" lint-imports --config "$repo/pyproject.toml"
