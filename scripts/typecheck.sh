#!/usr/bin/env bash
# Type-check the installed package names. The repository keeps one folder per part (physics/,
# drivers/, …) and setuptools maps them under `hotlab`; mypy cannot follow that mapping, so this
# lays the same tree out with symbolic links under build/ and checks `hotlab` there.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
tree=build/typecheck
rm -rf "$tree"
mkdir -p "$tree/hotlab"
for file in hotlab/*; do ln -s "$repo/$file" "$tree/hotlab/"; done
for part in physics drivers simulators controller; do ln -s "$repo/$part" "$tree/hotlab/$part"; done
cd "$tree"
exec "$repo/.venv/bin/mypy" --config-file "$repo/pyproject.toml" --cache-dir "$repo/.mypy_cache" -p hotlab "$@"
