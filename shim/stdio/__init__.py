"""A process's stdio: containerd's FIFOs wired to the container (terminals and log URIs come later)."""

from .fifo import ProcessIO

__all__ = ["ProcessIO"]
