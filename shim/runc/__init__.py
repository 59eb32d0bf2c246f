"""runc command-line client: one async method per runc verb, errors parsed from runc's log.json."""

from shim.runc.client import CriuOptions, Runc
from shim.runc.errors import RuncError

__all__ = ["CriuOptions", "Runc", "RuncError"]
