#!/usr/bin/env bash
# The main job: serve an in-memory filesystem and boot a Linux guest that uses it.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=$(bash "$here/scripts/bootstrap.sh")
exec "$py" "$here/scripts/demo.py"
