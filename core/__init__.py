"""dicomgate: a DICOM gateway between a clinic's information system, its imaging
devices and its PACS.

Plugins import what they need from this package: ``hookimpl`` to mark hook
implementations and the context classes the hooks pass. Everything a plugin may rely
on is documented in :mod:`dicomgate.hookspecs` and ``docs/hooks.md``.
"""

from importlib.metadata import PackageNotFoundError, version

import pluggy

try:
    __version__ = version("dicomgate")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

PROJECT = "dicomgate"
hookimpl = pluggy.HookimplMarker(PROJECT)

from dicomgate.errors import ConfigError, PluginError, UsageError  # noqa: E402
from dicomgate.services import AssociationInfo, Dimse, Request, Service  # noqa: E402
from dicomgate.peers import Peer  # noqa: E402
from dicomgate.db import Model, Schema, write_transaction  # noqa: E402

__all__ = [
    "AssociationInfo",
    "ConfigError",
    "Dimse",
    "Model",
    "Peer",
    "PluginError",
    "Request",
    "Schema",
    "Service",
    "UsageError",
    "hookimpl",
    "write_transaction",
    "__version__",
]
