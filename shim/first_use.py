"""What CPython writes into an object the first time it is used, done in the zygote (shim/zygote.py).

The interpreter fills some caches lazily: a class's version tag and its instances' shared attribute
names, a module's globals' keys version, a function's version. Each is a write into the object, and
for objects only servers use (most of the shim's), every server made that write into the zygote's
page, copying it. Done here, before the freeze, the pages stay shared. Each step touches only the
field it fills, runs no class or module code, and is best effort: :func:`run_all` skips a step that
fails, as an optimisation must never stop the zygote.
"""

from __future__ import annotations

import sys
import types


def run_all() -> None:
    """In the zygote, after its warm-up (which gives some of these their values by running code)."""
    for step in (fill_instance_keys, tag_types, tag_module_dicts, version_functions):
        try:
            step()
        except Exception:  # noqa: BLE001, PERF203 - an optimisation must never stop the zygote
            pass


def _init_attributes(init: object) -> list[str]:
    """The names ``__init__`` assigns as ``self.<name> = ...``, in order, read off its bytecode."""
    import dis

    if type(init) is not types.FunctionType or not init.__code__.co_argcount:
        return []
    names: list[str] = []
    previous = None
    for ins in dis.get_instructions(init):
        if ins.opname == "STORE_ATTR" and previous is not None and previous.opname == "LOAD_FAST" \
                and previous.arg == 0 and ins.argval not in names:
            names.append(ins.argval)
        previous = ins
    return names


_SHARED_KEYS_MAX = 30  # CPython 3.11-3.12: the most names one class's shared keys hold


def fill_instance_keys() -> None:
    """Put each class's instance attribute names into its shared keys now, as its first instances would.

    CPython keeps the names of a class's instance attributes in one keys table per class, which the
    first instance made fills as it sets them; and each new instance counts down the room it leaves for
    more (3.12: ``dk_usable``), down to 1. For a class only servers make instances of (most of the
    shim's), both are writes to the zygote's page in every server. Here bare instances
    (``object.__new__``, no ``__init__`` run) do both: the first gets the names ``__init__`` assigns
    ``self.<name>``, with ``object.__setattr__``, and as many more are made as the count can go down.
    Only classes whose instances are a bare object underneath (no C fields, no ``__slots__``) are done,
    and not those with their own ``__new__``, ``__setattr__``, ``__del__`` or a data descriptor of such
    a name, so no code of theirs runs."""
    import gc

    def static(cls: type, name: str) -> object:  # a class attribute, without running a descriptor
        return next((vars(base)[name] for base in cls.__mro__ if name in vars(base)), None)

    plain_new, plain_setattr, plain_size = object.__new__, object.__setattr__, object.__basicsize__
    for cls in gc.get_objects():
        if not issubclass(type(cls), type) or cls.__basicsize__ != plain_size or cls.__itemsize__ \
                or static(cls, "__new__") is not static(object, "__new__") \
                or static(cls, "__setattr__") is not plain_setattr \
                or any("__del__" in vars(base) for base in cls.__mro__[:-1]):
            continue  # C fields an instance made without __init__ would hold unset, or code of the class
        names = [n for n in _init_attributes(static(cls, "__init__"))
                 if not hasattr(type(static(cls, n)), "__set__")]
        try:
            bare = plain_new(cls)
            for name in names:
                plain_setattr(bare, name, None)
            del bare
            for _ in range(_SHARED_KEYS_MAX):
                plain_new(cls)  # made and dropped: what counts is that it was made
        except (TypeError, AttributeError):  # abstract, not a plain object underneath, __slots__
            continue


_CALL = compile("def call(function):\n    return function()\n", "<pyrunc-probe>", "exec")
_NOTHING = compile("def nothing():\n    return None\n", "<pyrunc-probe>", "exec")


def _code_of(source: types.CodeType, name: str) -> types.CodeType:
    namespace: dict[str, object] = {}
    exec(source, namespace)
    return namespace[name].__code__  # type: ignore[attr-defined]


def _fresh_version() -> tuple[int, int] | None:
    """A new function version from the interpreter, as (offset of ``func_version`` in a function object,
    the version), taken from a throwaway function whose call CPython specialises; None if that cannot be
    seen. Only the one 4-byte field may change, from 0 to the version."""
    import ctypes

    size = types.FunctionType.__basicsize__
    nothing = types.FunctionType(_code_of(_NOTHING, "nothing"), {})
    before = ctypes.string_at(id(nothing), size)
    call = types.FunctionType(_code_of(_CALL, "call").replace(), {})  # a call site of its own
    call(nothing)
    call(nothing)  # 3.11+: the second run specialises the call, which gives the callee its version
    after = ctypes.string_at(id(nothing), size)
    changed = [i for i in range(8, size, 4) if before[i:i + 4] != after[i:i + 4]]
    if len(changed) != 1 or before[changed[0]:changed[0] + 4] != bytes(4):
        return None
    offset = changed[0]
    version = ctypes.c_uint32.from_address(id(nothing) + offset)
    found = version.value
    version.value = 0  # the throwaway gives its version up: it is the taker's alone
    return offset, found


def version_functions() -> int:
    """Give the functions servers run (the code layout's profile) their function versions now.

    CPython 3.12 numbers a function the first time a call to it is specialised, a write to the function
    object, so to the zygote's page, in every server that calls a function the zygote never called. A
    version is a unique number taken from the interpreter's counter (it guards specialised calls, and is
    reset when a function's code or defaults change); each is taken here through a throwaway function,
    whose call the interpreter specialises, and handed over. 3.12 only (3.13 also maps versions back to
    functions); nothing happens unless the probe sees exactly that one field change. Returns how many."""
    import ctypes
    import gc

    from shim import code_layout

    if sys.implementation.name != "cpython" or sys.version_info[:2] != (3, 12) or hasattr(sys, "gettotalrefcount"):
        return 0
    first, second = _fresh_version() or (None, 0), _fresh_version() or (None, 0)
    if first[0] is None or first[0] != second[0] or not 0 < first[1] < second[1]:
        return 0  # not the field, or not a counter: leave functions alone
    offset = first[0]
    hot = set(code_layout.load_profile())
    given = 0
    for function in gc.get_objects():
        if type(function) is types.FunctionType and code_layout.key(function.__code__) in hot:
            field = ctypes.c_uint32.from_address(id(function) + offset)
            if field.value == 0:
                taken = _fresh_version()
                if taken is None or taken[0] != offset or not taken[1]:
                    break
                field.value = taken[1]
                given += 1
    return given


def tag_types() -> None:
    """Give every class its version tag now. CPython tags a class lazily, on its first lookup through
    the method cache, which for a class only servers use would be a write to the zygote's page in each."""
    import gc

    lookup = type.__getattribute__  # the plain lookup: no metaclass __getattr__ runs
    for obj in gc.get_objects():
        if issubclass(type(obj), type):  # not isinstance: a weakref.proxy to a class passes that
            try:
                lookup(obj, "__pyrunc_version_tag__")  # an interned name: a cacheable lookup tags
            except AttributeError:
                pass


_MODULE_PROBE = compile("def probe(module):\n    return module.__name__\n", "<pyrunc-probe>", "exec")


def tag_module_dicts() -> None:
    """Give every module's globals their keys version now. CPython gives it lazily, when it first
    specialises a global or module attribute lookup in that module, which for modules only servers run
    (most of ``shim``) would be a write to the zygote's page in each. A specialised ``module.__name__``
    does it: a fresh copy of the probe's code per module, as one site specialises for one module only."""
    code = _code_of(_MODULE_PROBE, "probe")
    for module in list(sys.modules.values()):
        if type(module) is types.ModuleType:
            probe = types.FunctionType(code.replace(), {})  # new bytecode, new counters
            for _ in range(3):  # 3.11+: the second run specialises
                probe(module)
