#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what it needs, then runs every
# tier (unit, integration against our daemon and QEMU's C virtiofsd, VM)
# twice: once on the compiled Cython modules, once on the pure-Python twins,
# asserting each time which implementation is active.
# Extra arguments go to pytest (e.g. -k codec, -m "not vm").
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
py=$(bash scripts/bootstrap.sh)
status=0
for impl in cython python; do
  echo "=== test suite, implementation: $impl ==="
  # Run from tests/ so the source tree is not importable: the installed build is tested.
  VIRTIOFS_ASYNC_IMPLEMENTATION=$impl VIRTIOFS_ASYNC_EXPECT_IMPLEMENTATION=$impl \
    "$py" -m pytest -p no:cacheprovider -q -rs "$@" || status=$?
done
exit $status
