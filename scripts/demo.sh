#!/usr/bin/env bash
# The main job: share a host directory with a Linux guest through our daemon and show the guest using it.
# Arguments go to scripts/demo.py (--shared-dir DIR, --memfs).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=$(bash "$here/scripts/bootstrap.sh")
exec "$py" "$here/scripts/demo.py" "$@"
