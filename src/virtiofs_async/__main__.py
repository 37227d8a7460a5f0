"""``python -m virtiofs_async``: the virtiofsd-compatible daemon (see :mod:`virtiofs_async.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
