"""Where the zygote's code objects sit in memory, so that its servers write to as few pages as they can.

CPython keeps each function's bytecode inside its code object and writes to it as the code runs: 3.11+
specialise instructions on their first runs, and every run of an instruction that cannot be specialised
(a call with keywords, an attribute behind ``__getattr__`` …) counts down a counter in the bytecode.
A server forked from the zygote so writes to the code objects of everything it runs, ~400 of them,
each on its own 4 KiB page among code it never runs: a page copied for each (~300 pages, 1.2 MiB per
server). :func:`pack` re-creates the code objects servers run one after the other, on ~50 pages.

Which code objects servers run comes from a profile (``shim/_hot_code.py``), recorded from real servers
by ``python tools/hot_code.py`` with :func:`record`. A stale entry costs nothing but its gain: code it
names that no longer exists is not found, code not in it stays where it was.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Sequence

_FILES: dict[str, str] = {}  # co_filename -> its path below the sys.path entry it came from


def key(code: types.CodeType) -> str:
    """A code object's name in the profile: its file below its ``sys.path`` entry, and its qualified name
    (``asyncio/base_events.py:BaseEventLoop.run_forever``), the same in any install, checkout or venv."""
    name = code.co_filename
    short = _FILES.get(name)
    if short is None:
        roots = [p.rstrip("/") + "/" for p in sys.path if p and name.startswith(p.rstrip("/") + "/")]
        short = _FILES[name] = name[len(max(roots, key=len)):] if roots else name
    return short + ":" + code.co_qualname


def _nested(code: types.CodeType) -> list[types.CodeType]:
    return [c for c in code.co_consts if isinstance(c, types.CodeType)]


def pack(hot: Sequence[str]) -> int:
    """Re-create, one after the other and in ``hot``'s order, the code objects whose :func:`key` is in
    ``hot``, and point every function at its new code; returns how many were re-created. Run before any of
    that code is specialised (the copies start unspecialised) and before ``gc.freeze``, while nothing runs
    it but the caller's own frames, which keep the code they started with.

    A function made later from nested code (a closure, a generator expression) gets its code from its
    parent's constants, so a parent of hot code is re-created too (just after its children), with the new
    code among its constants.
    """
    import gc

    rank = {k: i for i, k in enumerate(hot)}
    functions = [o for o in gc.get_objects() if type(o) is types.FunctionType]
    holds: dict[int, bool] = {}  # id -> whether the code is hot or holds hot code, however deep

    def holds_hot(code: types.CodeType) -> bool:  # recursive: as deep as functions are nested in source
        found = holds.get(id(code))
        if found is None:
            found = holds[id(code)] = key(code) in rank or any([holds_hot(c) for c in _nested(code)])
        return found

    tops = {id(f.__code__): f.__code__ for f in functions if holds_hot(f.__code__)}
    # The order to make the copies in, each code after the hot code it holds, worked out before the first
    # copy: nothing else the interpreter allocates on the way lands between two copies.
    last = len(rank)
    order: list[types.CodeType] = []
    placed: set[int] = set()
    for top in sorted(tops.values(), key=lambda c: rank.get(key(c), last)):
        stack = [(top, False)]
        while stack:
            code, children_done = stack.pop()
            if id(code) in placed:
                continue
            if children_done:
                placed.add(id(code))
                order.append(code)
            else:
                stack.append((code, True))
                stack.extend((c, False) for c in reversed(_nested(code)) if holds_hot(c))
    replaced: dict[int, types.CodeType | None] = dict.fromkeys(placed)  # sized once
    for code in order:  # code.replace() reads these; each is made (and kept) on first access: now
        code.co_code, code.co_varnames, code.co_cellvars, code.co_freevars  # noqa: B018
    for code in order:
        if any(holds_hot(c) for c in _nested(code)):
            consts = tuple(replaced[id(c)] if type(c) is types.CodeType and holds_hot(c) else c
                           for c in code.co_consts)
            replaced[id(code)] = code.replace(co_consts=consts)
        else:
            replaced[id(code)] = code.replace()
    for f in functions:
        new = replaced.get(id(f.__code__))
        if new is not None:
            f.__code__ = new
    return len(order)


def load_profile() -> tuple[str, ...]:
    """The recorded profile, in the order servers first ran its code; empty when there is none."""
    try:
        from shim._hot_code import HOT
    except ImportError:
        return ()
    return tuple(HOT)


def _record_line(code: types.CodeType) -> bytes:
    # where its bytecode is, for tools/hot_code.py to see whether a server wrote to it
    return f"{key(code)}\t{id(code)}\t{len(code.co_code)}\n".encode("utf-8", "backslashreplace")


def record(directory: str) -> bool:
    """Append to ``<directory>/<pid>.txt`` a line for the code running now (the caller's frames, which go on
    running), then for each code object this process starts running, once each; and so on in the
    processes it forks. A line: :func:`key`, the code object's address and its bytecode's length, tab
    separated. CPython 3.12+ (``sys.monitoring``); False where it cannot."""
    monitoring = getattr(sys, "monitoring", None)
    if monitoring is None:
        return False
    tool = monitoring.PROFILER_ID
    try:
        monitoring.use_tool_id(tool, "pyrunc-code-layout")
    except ValueError:
        return False  # taken: a profiler is running this process
    out = os.open(os.path.join(directory, f"{os.getpid()}.txt"),
                  os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    running, frame = [], sys._getframe(1)
    while frame is not None:
        running.append(frame.f_code)
        frame = frame.f_back
    os.write(out, b"".join(_record_line(code) for code in reversed(running)))

    def started(code: types.CodeType, _offset: int) -> object:
        os.write(out, _record_line(code))
        return monitoring.DISABLE  # once per code object: no further events from it

    monitoring.register_callback(tool, monitoring.events.PY_START, started)
    monitoring.set_events(tool, monitoring.events.PY_START)
    return True
