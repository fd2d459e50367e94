#!/usr/bin/env bash
# The main job on a fresh machine: set up, then run the controller. Without arguments it runs a
# simulated hot lab with a private broker and a private InfluxDB (influxd, written to and queryable
# as the start-up lines say); pass `--config lab.toml` for a real one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/hotlab run "$@"
