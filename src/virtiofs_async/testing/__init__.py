"""Test helpers: in-process stand-ins for the guest and for QEMU.

- :class:`VhostUserFsFrontend` (``testing.frontend``) plays QEMU's
  vhost-user-fs-pci device plus the guest's virtqueues: it connects to a
  daemon's socket, shares guest RAM (a memfd), lays out split rings and moves
  descriptor chains, many in flight at once.
- :class:`FuseClient` (``testing.client``) plays the guest's virtiofs
  driver: one async method per FUSE opcode, typed replies, ``FuseError`` on
  error replies. ``async with FuseClient.connect(path) as client:`` gives a
  ready (FUSE_INIT done) client.
- :func:`serve_in_background` runs a daemon (``server.make_server``) in the
  current event loop for the duration of an ``async with`` block.
- :class:`DriverQueue` (``testing.driver_queue``): the guest side of one
  split virtqueue, for building well-formed or malformed rings by hand.

Together they let a pytest suite test a backend through the real transport
(vhost-user socket, eventfds, shared memory) without a VM, under asyncio,
uvloop or trio. The VM tier lives in ``testing.vm`` (imported on demand: it
is not loaded by this package).
"""
from __future__ import annotations

from .client import LINUX_6_1_INIT_FLAGS, Caller, FuseClient
from .driver_queue import DriverQueue, DriverQueueError, DriverQueueFull, Used
from .frontend import (
    DEFAULT_PROTOCOL_FEATURES,
    FrontendError,
    VhostUserFsFrontend,
    VhostUserNack,
    serve_in_background,
)

__all__ = [
    "DEFAULT_PROTOCOL_FEATURES",
    "LINUX_6_1_INIT_FLAGS",
    "Caller",
    "DriverQueue",
    "DriverQueueError",
    "DriverQueueFull",
    "FrontendError",
    "FuseClient",
    "Used",
    "VhostUserFsFrontend",
    "VhostUserNack",
    "serve_in_background",
]
