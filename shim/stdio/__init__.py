"""A process's stdio: containerd's FIFOs, ``binary://`` loggers and ``file://`` logs, terminals.

:mod:`.process_io` puts them together for one process; :mod:`.relay` moves bytes on the event loop,
:mod:`.console` receives pty masters, :mod:`.logger` runs loggers, :mod:`.uri` parses destinations,
:mod:`.fifo` opens them.
"""

from .process_io import ProcessIO

__all__ = ["ProcessIO"]
