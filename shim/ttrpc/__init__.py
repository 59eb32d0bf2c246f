"""ttrpc for Python: containerd's lightweight RPC over unix sockets.

Standalone: imports nothing else from ``shim``. Layers: :mod:`.codec` (sans-IO frames),
:mod:`.wire` (the envelope messages), :mod:`.errors`, :mod:`.metadata`, and thin asyncio
transports :mod:`.server` and :mod:`.client`. Unary calls only; see :mod:`.server` on streaming.
"""

from .client import Client
from .codec import MAX_MESSAGE_SIZE, Frame, FrameDecoder, OversizedFrame, encode_frame
from .errors import ClosedError, Code, TTRPCError
from .metadata import Metadata
from .server import Method, Server, ServerContext

__all__ = [
    "MAX_MESSAGE_SIZE",
    "Client",
    "ClosedError",
    "Code",
    "Frame",
    "FrameDecoder",
    "Metadata",
    "Method",
    "OversizedFrame",
    "Server",
    "ServerContext",
    "TTRPCError",
    "encode_frame",
]
