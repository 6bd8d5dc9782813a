"""Run untrusted Python against tests in a sandboxed process tree; verdicts come from a harness
that never runs the program.

One run is a small process tree::

    caller (the trainer)   run_program(): spawns the harness, enforces a backstop wall clock and
    |                      the output cap, kills the tree, sweeps leftovers, removes the run dir
    +- harness             TRUSTED. This file, executed by `python -s -S`. Runs the tests; never
       |                   executes a line of the program.
       +- init             PID 1 of a fresh PID namespace ("namespaces" level only). Reaps
          |                orphans and reports how the worker ended; when it dies the kernel
          |                kills everything left in the namespace (double-forked daemons too).
          +- worker        UNTRUSTED. `python -s -S -c WORKER`: runs the program, then answers
                           the harness's requests ("call f with (1, 2)") with plain values.

Why a verdict cannot be forged: the test code runs in the harness, where the program's function
is a proxy whose calls travel over a pipe to the worker. What comes back is decoded into exact
builtin types (int, str, list, dict, ...) or into an opaque proxy that does not forward
comparison. So an object whose ``__eq__`` always answers True never reaches a comparison,
monkeypatched builtins or harness functions live in the other process, and exit codes, printed
text and written files are never read as results. The worker never sees the tests or the
expected values, so the only way to pass is to return the right values.

Isolation levels (``SandboxLimits.isolation``; "auto" picks the first that works, see
docs/sandbox.md):

``namespaces`` (meta ``isolation: "strong"``)
    new network (no interfaces up), mount, PID, IPC and UTS namespaces, plus a user namespace
    when not root; a read-only minimal root holding only Python and the system libraries; a
    private, size-capped tmpfs as /tmp and cwd; a separate uid per run (root) or no
    capabilities (user namespace); no_new_privs.
``uid`` (meta ``isolation: "weak"``)
    root without namespaces (e.g. Docker's default seccomp profile): a separate uid per run,
    which protects the host's files and processes, plus the guard below.
``audit`` (meta ``isolation: "weak"``)
    neither: the guard only.

The guard is a PEP 578 audit hook installed in the worker before the program runs (weak levels
only). It refuses sockets, process creation, signals, ctypes and file access outside the run
directory and the Python installation. It is best effort: code in the same interpreter can in
principle get around an audit hook, which is why those levels are reported as weak.

All levels apply rlimits (CPU, address space, file size, processes, open files, no core dumps)
in the worker before exec, give it a scrubbed environment, and cap what it prints.

This file is also the harness script, so it imports nothing outside the standard library, and
the worker's functions are shipped to the worker as code (see `_worker_code`).
"""

from __future__ import annotations

import _json
import _signal as signal  # the C module: `signal` itself imports enum, ~5 ms for every harness
import binascii
import builtins
import marshal
import os
import select
import struct
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: importing typing would cost every harness ~10 ms
    from typing import Any

# ============================================================================================
# The value codec and framing, shared by the harness and the worker (shipped as source).
#
# Plain values travel as JSON with tags: {"i": hex} int, {"f": hex} float, {"c": [re, im]},
# {"b": hex} bytes, {"ba": hex} bytearray, {"t": [...]} tuple, {"s": [...]} set, {"fs": [...]}
# frozenset, {"d": [[k, v], ...]} dict, {"ty": "int"} a builtin value type, {"h": ...} a
# handle to an object left in the worker;
# None, bools, strings and lists are JSON's own. Decoding builds exact builtin types only.
# ============================================================================================


def _encode_value(value, fallback):
    """A plain value as tagged JSON; anything else goes to ``fallback(value)``."""
    kind = type(value)
    if value is None or kind is bool or kind is str:
        return value
    if kind is int:
        return {"i": format(value, "x")}
    if kind is float:
        return {"f": value.hex()}
    if kind is list:
        return [_encode_value(item, fallback) for item in value]
    if kind is tuple:
        return {"t": [_encode_value(item, fallback) for item in value]}
    if kind is dict:
        return {"d": [[_encode_value(k, fallback), _encode_value(v, fallback)] for k, v in value.items()]}
    if kind is set or kind is frozenset:
        return {"s" if kind is set else "fs": [_encode_value(item, fallback) for item in value]}
    if kind is bytes or kind is bytearray:
        return {"b" if kind is bytes else "ba": value.hex()}
    if kind is complex:
        return {"c": [value.real.hex(), value.imag.hex()]}
    return _encode_subclass(value, fallback)


def _encode_subclass(value, fallback):
    """Subclasses of plain types (Counter, namedtuple, IntEnum) travel as their base value,
    read through the base type's own methods so that overrides are not consulted."""
    if isinstance(value, int):
        return {"i": format(int.__index__(value), "x")}
    if isinstance(value, float):
        return {"f": float.hex(value)}
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, tuple):
        return {"t": [_encode_value(item, fallback) for item in tuple.__iter__(value)]}
    if isinstance(value, list):
        return [_encode_value(item, fallback) for item in list.__iter__(value)]
    if isinstance(value, dict):
        pairs = dict.items(value)
        return {"d": [[_encode_value(k, fallback), _encode_value(v, fallback)] for k, v in pairs]}
    if isinstance(value, frozenset):
        return {"fs": [_encode_value(item, fallback) for item in frozenset.__iter__(value)]}
    if isinstance(value, set):
        return {"s": [_encode_value(item, fallback) for item in set.__iter__(value)]}
    if type(value) is type and _is_plain_type(value):
        return {"ty": value.__name__}
    return fallback(value)


def _is_plain_type(value):
    """int, str, list, ... themselves (MBPP passes types as arguments). Only value types: a
    builtin function such as eval must never come back to the harness as itself."""
    names = ("bool", "int", "float", "complex", "str", "bytes", "bytearray", "list", "tuple",
             "dict", "set", "frozenset", "object", "type", "range", "slice")
    name = getattr(value, "__name__", None)
    return name in names and getattr(builtins, name, None) is value


def _decode_value(data, resolve):
    """Tagged JSON back to a value built from exact builtin types; ``resolve`` turns a handle's
    body into an object. Raises ValueError on anything malformed."""
    kind = type(data)
    if data is None or kind is bool or kind is str:
        return data
    if kind is list:
        return [_decode_value(item, resolve) for item in data]
    if kind is not dict or len(data) != 1:
        raise ValueError("malformed value")
    ((tag, body),) = data.items()
    if tag == "h":
        return resolve(body)
    if tag in ("t", "s", "fs", "d", "c") and type(body) is not list:
        raise ValueError("malformed container")
    if tag == "i" and type(body) is str:
        return int(body, 16)
    if tag == "f" and type(body) is str:
        return float.fromhex(body)
    if tag == "b" and type(body) is str:
        return bytes.fromhex(body)
    if tag == "ba" and type(body) is str:
        return bytearray.fromhex(body)
    if tag == "c" and len(body) == 2 and type(body[0]) is str and type(body[1]) is str:
        return complex(float.fromhex(body[0]), float.fromhex(body[1]))
    if tag == "ty" and type(body) is str and _is_plain_type(getattr(builtins, body, None)):
        return getattr(builtins, body)
    items = [_decode_value(item, resolve) for item in body] if tag != "d" else None
    if tag == "t":
        return tuple(items)
    if tag == "s":
        return set(items)
    if tag == "fs":
        return frozenset(items)
    if tag == "d":
        return _decode_dict(body, resolve)
    raise ValueError(f"unknown tag {tag!r}")


def _decode_dict(body, resolve):
    out = {}
    for pair in body:
        if type(pair) is not list or len(pair) != 2:
            raise ValueError("malformed dict item")
        out[_decode_value(pair[0], resolve)] = _decode_value(pair[1], resolve)
    return out


def _frame(message):
    """Length-prefixed marshal: for the trusted directions (caller -> harness -> worker)."""
    payload = marshal.dumps(message)
    return struct.pack(">I", len(payload)) + payload


def _to_json(value):
    """JSON text for the worker's replies (dicts, lists, str, small int, bool, None). Written
    out here because importing json (and re) would cost every worker ~9 ms."""
    kind = type(value)
    if kind is str:
        return _json.encode_basestring_ascii(value)
    if value is None or kind is bool:
        return "null" if value is None else ("true" if value else "false")
    if kind is int:
        return int.__repr__(value)
    if kind is list:
        return "[" + ",".join([_to_json(item) for item in value]) + "]"
    if kind is dict:
        items = [_json.encode_basestring_ascii(str(key)) + ":" + _to_json(item) for key, item in value.items()]
        return "{" + ",".join(items) + "}"
    raise TypeError(f"cannot encode {kind.__name__}")


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# ============================================================================================
# The worker (UNTRUSTED side). These functions are shipped as source and run in a fresh
# interpreter; they may use only the modules imported in _WORKER_PREAMBLE and each other.
# Nothing here is trusted by the harness: the program can rewrite all of it.
# ============================================================================================


def _worker_main():
    """Run by the worker: serve the harness's requests on fds 3 (in) and 4 (out) until EOF."""
    config = marshal.loads(binascii.a2b_base64(sys.argv[-1]))
    sys.argv = ["__solution__"]
    if config["guard"]:
        _install_guard(config["guard"])
    module = type(sys)("__solution__")
    sys.modules["__solution__"] = module
    state = {"handles": {}, "module": module, "cap": config["result_bytes"]}
    _worker_reply({"hello": True}, state)
    while True:
        request = _worker_receive()
        if request is None:
            os._exit(0)
        reply = _worker_dispatch(request, state)
        reply["id"] = request.get("id")
        _worker_reply(reply, state)


def _worker_receive():
    header = _worker_read_exact(4)
    if header is None:
        return None
    body = _worker_read_exact(struct.unpack(">I", header)[0])
    return None if body is None else marshal.loads(body)


def _worker_read_exact(size):
    chunks, remaining = [], size
    while remaining:
        chunk = os.read(3, min(remaining, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _worker_reply(reply, state):
    try:
        payload = _to_json(reply).encode()
    except BaseException as exc:
        payload = _to_json({"raise": _describe_exception(exc), "id": reply.get("id")}).encode()
    if len(payload) > state["cap"]:
        message = f"the value is {len(payload)} bytes encoded, over the {state['cap']} byte limit"
        error = {"type": "ResultTooLarge", "builtin": "Exception", "message": message}
        payload = _to_json({"raise": error, "limit": "result_size", "id": reply.get("id")}).encode()
    _write_all(4, struct.pack(">I", len(payload)) + payload)


def _worker_dispatch(request, state):
    try:
        op = request["op"]
        if op == "load":
            return _worker_load(request, state)
        if op == "resolve":
            return _worker_resolve(request["name"], state)
        target = state["handles"][request["target"]]
        if op == "call":
            return _worker_call(target, request, state)
        if op == "getattr":
            return {"value": _worker_encode(getattr(target, request["name"]), state)}
        return {"value": _worker_encode(_worker_special(target, request, state), state)}
    except BaseException as exc:
        return {"raise": _describe_exception(exc)}
    finally:
        _worker_flush()


def _worker_flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


def _worker_load(request, state):
    namespace = state["module"].__dict__
    try:
        exec(compile(request["program"], "<program>", "exec"), namespace)
        if request["setup"]:
            exec(compile(request["setup"], "<setup>", "exec"), namespace)
    except BaseException as exc:
        return {"ok": False, "error": _format_exception(exc), "raise": _describe_exception(exc)}
    return {"ok": True}


def _worker_resolve(name, state):
    namespace = state["module"].__dict__
    if name not in namespace:
        return {"missing": True}
    value = namespace[name]
    if isinstance(value, type(sys)):
        return {"module": str(getattr(value, "__name__", "")), "value": _worker_encode(value, state)}
    return {"value": _worker_encode(value, state)}


def _worker_call(target, request, state):
    handles = state["handles"]
    args = [_decode_value(arg, handles.__getitem__) for arg in request["args"]]
    kwargs = {key: _decode_value(arg, handles.__getitem__) for key, arg in request["kwargs"].items()}
    result = target(*args, **kwargs)
    reply = {"value": _worker_encode(result, state)}
    # Report arguments changed in place, so that tests which check a mutation see it.
    mutated = []
    for index, arg in enumerate(args):
        if type(arg) in (list, dict, set, bytearray):
            encoded = _worker_encode(arg, state)
            if encoded != request["args"][index]:
                mutated.append([index, encoded])
    if mutated:
        reply["mutated"] = mutated
    return reply


def _worker_special(target, request, state):
    method = request["method"]
    handles = state["handles"]
    if method == "iter":
        items = []
        for item in target:
            items.append(item)
            if len(items) > 1_000_000:
                raise OverflowError("iterable longer than 1,000,000 items")
        return items
    simple = {"len": len, "str": str, "bool": bool, "int": int, "float": float}
    if method in simple:
        return simple[method](target)
    if method == "index":
        return target.__index__()
    argument = _decode_value(request["arg"], handles.__getitem__)
    if method == "getitem":
        return target[argument]
    if method == "contains":
        return argument in target
    raise ValueError(f"unknown method {method!r}")


def _worker_encode(value, state):
    handles = state["handles"]

    def keep(obj):
        handles[len(handles) + 1] = obj
        try:
            name = str(type(obj).__name__)[:80]
        except BaseException:
            name = "object"
        return {"h": [len(handles), name]}

    return _encode_value(value, keep)


def _describe_exception(exc):
    kind = type(exc)
    builtin = "BaseException"
    for cls in kind.__mro__:
        if getattr(builtins, cls.__name__, None) is cls:
            builtin = cls.__name__
            break
    try:
        message = str(exc)[:500]
    except BaseException:
        message = "<unprintable>"
    errno = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    return {
        "type": str(kind.__name__)[:100],
        "builtin": builtin,
        "message": message,
        "errno": errno if type(errno) is int else None,
    }


def _format_exception(exc):
    try:
        import traceback

        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except BaseException:
        text = repr(exc)
    return text[-2000:]


def _install_guard(guard):
    """Weak levels: refuse network, processes, signals, ctypes, and files outside the roots.

    A PEP 578 audit hook runs in C before each audited operation, so a monkeypatched ``socket``
    or ``os`` module does not get past it. Everything the hook consults is bound as a default
    argument and the path check is plain string work, so that patching this module's globals or
    ``os.path`` does not change its answers either.
    """
    denied, denied_imports = frozenset(guard["denied"]), frozenset(guard["denied_imports"])
    writes, reads = frozenset(guard["writes"]), frozenset(guard["reads"])
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    roots = (tuple(guard["read"]) + tuple(guard["write"]), tuple(guard["write"]))

    def inside(path, allowed, getcwd=os.getcwd, fspath=os.fspath, str_=str, bytes_=bytes, int_=int):
        if type(path) is int_:
            return True  # an open descriptor: its opening was already checked
        path = fspath(path)
        if type(path) is bytes_:
            path = path.decode("utf-8", "surrogateescape")
        if type(path) is not str_:
            return False
        if not path.startswith("/"):
            path = getcwd() + "/" + path
        parts = []
        for part in path.split("/"):
            if part == "..":
                if parts:
                    parts.pop()
            elif part not in ("", "."):
                parts.append(part)
        path = "/" + "/".join(parts)
        for root in allowed:
            if path == root or path.startswith(root.rstrip("/") + "/"):
                return True
        return False

    def hook(event, args, denied=denied, denied_imports=denied_imports, writes=writes,
             reads=reads, roots=roots, write_flags=write_flags, inside=inside,
             refuse=PermissionError, str_=str, int_=int):
        if event in denied:
            raise refuse(f"sandbox: {event} is not allowed")
        if event == "import" and type(args[0]) is str_ and args[0].partition(".")[0] in denied_imports:
            raise refuse(f"sandbox: importing {args[0]} is not allowed")
        if event == "open":
            flags = args[2] if type(args[2]) is int_ else 0
            mode = args[1] if type(args[1]) is str_ else ""
            writing = bool(flags & write_flags) or "w" in mode or "a" in mode or "x" in mode or "+" in mode
            if args[0] is not None and not inside(args[0], roots[1] if writing else roots[0]):
                raise refuse(f"sandbox: opening {args[0]!r} is not allowed")
        elif event == "os.rename":
            if not (inside(args[0], roots[1]) and inside(args[1], roots[1])):
                raise refuse("sandbox: renaming outside the run directory is not allowed")
        elif event in writes:
            if not inside(args[0], roots[1]):
                raise refuse(f"sandbox: {event} outside the run directory is not allowed")
        elif event in reads:
            if args[0] is not None and not inside(args[0], roots[0]):
                raise refuse(f"sandbox: {event} of {args[0]!r} is not allowed")

    sys.addaudithook(hook)


_WORKER_PREAMBLE = "import _json, binascii, builtins, marshal, os, struct, sys\n"
_WORKER_FUNCTIONS = (
    _encode_value, _encode_subclass, _is_plain_type, _decode_value, _decode_dict, _to_json, _write_all,
    _worker_main,
    _worker_receive, _worker_read_exact, _worker_reply, _worker_dispatch, _worker_flush,
    _worker_load, _worker_resolve, _worker_call, _worker_special, _worker_encode,
    _describe_exception, _format_exception, _install_guard,
)


# ============================================================================================
# The harness (TRUSTED side). Started by the caller through _BOOTSTRAP; reads one marshalled
# request on stdin and writes events as <nonce><length><marshal> frames on stdout. It imports
# only what is above this point (see the exit at the end of this section).
# ============================================================================================

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE = 1024, 2048, 4096, 16384, 1 << 18
MS_RELATIME, MS_STRICTATIME, MNT_DETACH = 1 << 21, 1 << 24, 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 4, 24, 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
# The guard's policy (weak levels): audit events refused outright, modules that may not be
# imported, and events whose first argument is a path that must lie in the run directory
# (writes) or in the run directory or the Python installation (reads).
GUARD_DENIED_EVENTS = (
    "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
    "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo",
    "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "subprocess.Popen",
    "os.kill", "os.killpg", "signal.pthread_kill", "os.link", "os.symlink",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
    "resource.setrlimit", "resource.prlimit", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "sys._current_frames", "code.__new__",
)
GUARD_DENIED_IMPORTS = ("ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters")
GUARD_WRITE_EVENTS = ("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
                      "shutil.rmtree", "os.setxattr", "os.removexattr", "sqlite3.connect")
GUARD_READ_EVENTS = ("os.listdir", "os.scandir", "os.chdir")
_ERRNO_LIMITS = {27: "file_size", 11: "processes", 24: "open_files", 12: "memory", 28: "disk"}
_UNSAFE_STDLIB_NAMES = frozenset(("this", "antigravity", "idlelib", "turtledemo", "tkinter", "turtle"))
_LIBC: Any = None


class _Broken(BaseException):
    """The worker can no longer be trusted to answer (it died, timed out or spoke garbage).

    A BaseException so that a test's ``except Exception:`` cannot swallow it; the test that
    saw it and every later one fail."""


class _ProgramAborted(BaseException):
    """The program raised SystemExit, KeyboardInterrupt or the like inside a call."""


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        import ctypes

        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _check(result: int, what: str) -> None:
    if result != 0:
        import ctypes

        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _prctl(option: int, value: int) -> None:
    import ctypes

    zero = ctypes.c_ulong(0)
    _check(_libc().prctl(option, ctypes.c_ulong(value), zero, zero, zero), f"prctl({option})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    import ctypes

    def enc(text: str | None) -> bytes | None:
        return None if text is None else os.fsencode(text)

    result = _libc().mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))
    _check(result, f"mount {target}")


class _Emitter:
    """Writes events for the caller. Each frame starts with the run's nonce (sent on our stdin,
    which nothing else can read): if anything else ever wrote to this pipe, the caller would
    see a bad frame and fail the run rather than believe it."""

    def __init__(self, nonce: bytes) -> None:
        self.nonce = nonce
        self.fd = os.dup(1)
        os.dup2(2, 1)  # whatever the test code prints goes to diagnostics, not to the events

    def __call__(self, event: str, **fields: Any) -> None:
        payload = marshal.dumps({"event": event, **fields})
        _write_all(self.fd, self.nonce + struct.pack(">I", len(payload)) + payload)


def _harness_main() -> None:
    request = marshal.loads(_read_until_eof(0))
    emit = _Emitter(request["nonce"])
    try:
        _harden_harness(request)
        plan = _TestPlan(request)
        scope = _trusted_scope(request)
    except Exception as exc:
        emit("error", message=f"bad request: {type(exc).__name__}: {exc}"[:2000])
        return
    emit("plan", tests=plan.count)
    try:
        worker = _start_worker(request)
    except Exception as exc:
        emit("error", message=f"isolation {request['level']!r} unavailable: {type(exc).__name__}: {exc}")
        return
    strong = request["level"] == "namespaces"
    emit("started", level=request["level"], isolation="strong" if strong else "weak",
         features=worker.features, child=worker.pid)
    link = _Link(worker.request_fd, worker.reply_fd, request["limits"])
    try:
        _run_session(request, plan, scope, link, emit)
    except Exception as exc:  # a bug of ours, not the program's doing (its errors are caught)
        emit("error", message=f"the harness failed: {type(exc).__name__}: {exc}")
    finally:
        limit, exit_text = worker.stop(link.eof, request["limits"]["cpu_s"])
        emit("done", limit=link.limit or limit, worker_exit=exit_text)


def _read_until_eof(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _harden_harness(request: dict) -> None:
    """Die with the caller; make our memory and fds unreadable to same-uid processes."""
    # Load now what the forked init and worker children use: after pivot_root or setuid they may
    # no longer be able to read this interpreter's standard library.
    import fcntl  # noqa: F401
    import resource

    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != request["parent_pid"]:
        os._exit(1)  # the caller died before the line above took effect
    _prctl(PR_SET_DUMPABLE, 0)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Test code does arithmetic on values the program chose; cap what that can allocate.
    memory = max(2048, 2 * request["limits"]["memory_mb"]) << 20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))


def _trusted_scope(request: dict) -> dict:
    scope: dict = {"__name__": "__posttrain_tests__", "__builtins__": builtins}
    if request["prelude"]:
        exec(compile(request["prelude"], "<prompt>", "exec"), scope)
    return scope


def _run_session(request: dict, plan: _TestPlan, scope: dict, link: _Link, emit: _Emitter) -> None:
    try:
        link.hello(startup_s=max(30.0, request["limits"]["wall_s"]))
    except _Broken as exc:
        emit("error", message=f"the worker did not start: {exc}")
        return
    link.deadline = time.monotonic() + request["limits"]["wall_s"]
    ok, error = link.load(request["program"], request["setup"])
    emit("loaded", ok=ok, error=error)
    if not ok:
        return
    try:
        _bind_names(scope, plan, link)
    except _Broken:
        return  # every test stays failed; the caller reads why from "done"
    if plan.tests is None:
        _run_check(plan, scope, link, emit)
    else:
        _run_tests(plan, scope, link, emit)


class _TestPlan:
    """The tests as the caller prepared them (see _prepare_tests): ``tests`` (statements) or
    ``check`` (instrumented check() source), how many there are, and the free names to bind."""

    def __init__(self, request: dict) -> None:
        self.entry_point: str | None = request["entry_point"]
        self.tests: list[str] | None = request["tests"]
        self.check: str | None = request["check"]
        self.count: int = request["count"]
        self.whole: bool = request["whole"]
        self.names: list[str] = request["names"]
        self.module_names: set[str] = set(request["module_names"])  # used only as `name.attr`


def _bind_names(scope: dict, plan: _TestPlan, link: _Link) -> None:
    """Give the tests' free names values. Trusted ones win: the prelude's, the builtins, and a
    standard-library module for a name the tests use only as ``name.attr`` (so a program's fake
    ``math`` never judges ``math.isclose``). The rest, and always the entry point, come from the
    program; a name it lacks may still be a standard-library module."""
    names = set(plan.names)
    if plan.entry_point:
        names.add(plan.entry_point)
    for name in sorted(names):
        if name != plan.entry_point:
            if name in scope or hasattr(builtins, name):
                continue
            module = _trusted_module(name) if name in plan.module_names else None
            if module is not None:
                scope[name] = module
                continue
        found, value = link.resolve(name)
        if found:
            scope[name] = value
        elif name == plan.entry_point:
            scope.pop(name, None)  # the prompt's stub must not stand in for a missing function
        elif _trusted_module(name) is not None:
            scope[name] = _trusted_module(name)


def _trusted_module(name: str) -> Any:
    if name not in sys.stdlib_module_names or name in _UNSAFE_STDLIB_NAMES:
        return None
    try:
        return __import__(name)
    except ImportError:
        return None


def _run_tests(plan: _TestPlan, scope: dict, link: _Link, emit: _Emitter) -> None:
    for index, source in enumerate(plan.tests or []):
        if link.broken is not None:
            emit("test", index=index, passed=False, error=f"not run: {link.broken}")
            continue
        try:
            exec(compile(source, f"<test {index}>", "exec"), scope)
            error = None
        except BaseException as exc:
            error = exc
        passed = error is None and link.broken is None
        emit("test", index=index, passed=passed, error=None if passed else _failure_text(error, link))


def _run_check(plan: _TestPlan, scope: dict, link: _Link, emit: _Emitter) -> None:
    recorded: set[int] = set()

    def record(index: int, error: BaseException | None) -> None:
        passed = error is None and link.broken is None
        recorded.add(index)
        emit("test", index=index, passed=passed, error=None if passed else _failure_text(error, link))

    scope["__posttrain_record__"] = record
    try:
        exec(compile(plan.check or "", "<test>", "exec"), scope)
        scope["check"](scope[plan.entry_point])
        outcome: BaseException | None = None
    except BaseException as exc:
        outcome = exc
    if plan.whole:
        record(0, outcome)
        return
    for index in range(plan.count):
        if index not in recorded:
            record(index, outcome or RuntimeError("not reached"))


def _failure_text(error: BaseException | None, link: _Link) -> str:
    if link.broken is not None:
        return f"sandbox: {link.broken}"
    if error is None:
        return "failed"
    text = str(error)
    return (f"{type(error).__name__}: {text}" if text else type(error).__name__)[:300]


class _Remote:
    """Stands in, inside the harness, for an object that lives in the worker.

    Calls, attribute reads, len/iter/str/bool/int/float and indexing are forwarded and come
    back as plain values or further proxies. Comparison and hashing are deliberately not
    forwarded: they fall back to identity, so an object claiming to equal everything equals
    nothing here, and one that orders against anything raises TypeError.
    """

    __slots__ = ("_link", "_id", "_type")

    def __init__(self, link: _Link, handle: int, type_name: str) -> None:
        self._link, self._id, self._type = link, handle, type_name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._link.call(self._id, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)  # protocols (copy, pickle) must not reach the program
        return self._link.value({"op": "getattr", "target": self._id, "name": name})

    def _special(self, method: str, expected: tuple[type, ...], arg: Any = None) -> Any:
        message = {"op": "special", "target": self._id, "method": method, "arg": self._link.encode(arg)}
        value = self._link.value(message)
        if type(value) not in expected:
            raise TypeError(f"{self._type}: {method} returned {type(value).__name__}")
        return value

    def __iter__(self) -> Any:
        return iter(self._special("iter", (list,)))

    def __len__(self) -> int:
        return self._special("len", (int,))

    def __bool__(self) -> bool:
        return self._special("bool", (bool,))

    def __str__(self) -> str:
        return self._special("str", (str,))

    def __int__(self) -> int:
        return self._special("int", (int,))

    def __float__(self) -> float:
        return self._special("float", (float,))

    def __index__(self) -> int:
        return self._special("index", (int,))

    def __getitem__(self, key: Any) -> Any:
        message = {"op": "special", "target": self._id, "method": "getitem", "arg": self._link.encode(key)}
        return self._link.value(message)

    def __contains__(self, item: Any) -> bool:
        return self._special("contains", (bool,), item)

    def __repr__(self) -> str:
        return f"<sandboxed {self._type} object>"


class _Link:
    """The harness's end of the pipes to the worker. Everything read here is untrusted: replies
    are size-capped, decoded strictly, and any deviation breaks the link for good."""

    def __init__(self, request_fd: int, reply_fd: int, limits: dict) -> None:
        self.request_fd, self.reply_fd = request_fd, reply_fd
        self.max_frame = limits["result_bytes"] + 65536
        self.deadline = float("inf")
        self.broken: str | None = None
        self.limit: str | None = None
        self.eof = False
        self.next_id = 0
        os.set_blocking(request_fd, False)

    def note_limit(self, name: str | None) -> None:
        if name and self.limit is None:
            self.limit = name

    def fail(self, reason: str, limit: str | None = None) -> Any:
        self.note_limit(limit)
        if self.broken is None:
            self.broken = reason
        raise _Broken(self.broken)

    # -- requests ------------------------------------------------------------------------

    def hello(self, startup_s: float) -> None:
        self.deadline = time.monotonic() + startup_s
        if self._receive() != {"hello": True}:
            self.fail("the worker sent a bad greeting")

    def load(self, program: str, setup: str) -> tuple[bool, str | None]:
        try:
            reply = self.exchange({"op": "load", "program": program, "setup": setup})
        except _Broken as exc:
            return False, f"sandbox: {exc}"
        if reply.get("ok") is True:
            return True, None
        info = reply.get("raise")
        if isinstance(info, dict):
            self._note_exception_limits(info)
        return False, str(reply.get("error"))[-2000:]

    def resolve(self, name: str) -> tuple[bool, Any]:
        reply = self.exchange({"op": "resolve", "name": name})
        if reply.get("missing") is True:
            return False, None
        module = reply.get("module")
        if type(module) is str and _trusted_module(module) is not None:
            return True, _trusted_module(module)
        return True, self._result(reply)

    def call(self, target: int, args: tuple, kwargs: dict) -> Any:
        message = {
            "op": "call",
            "target": target,
            "args": [self.encode(arg) for arg in args],
            "kwargs": {str(key): self.encode(arg) for key, arg in kwargs.items()},
        }
        reply = self.exchange(message)
        self._apply_mutations(args, reply.get("mutated"))
        return self._result(reply)

    def value(self, message: dict) -> Any:
        return self._result(self.exchange(message))

    def encode(self, value: Any) -> Any:
        def outbound(obj: Any) -> Any:
            if isinstance(obj, _Remote) and obj._link is self:
                return {"h": obj._id}
            raise TypeError(f"cannot pass a {type(obj).__name__} into the sandbox (plain values only)")

        return _encode_value(value, outbound)

    # -- replies -------------------------------------------------------------------------

    def _result(self, reply: dict) -> Any:
        if "raise" in reply:
            self._raise_remote(reply)
        if "value" not in reply:
            self.fail("malformed reply")
        try:
            return _decode_value(reply["value"], self._proxy)
        except Exception as exc:
            return self.fail(f"malformed value from the program: {type(exc).__name__}")

    def _proxy(self, body: Any) -> _Remote:
        if type(body) is not list or len(body) != 2 or type(body[0]) is not int or type(body[1]) is not str:
            raise ValueError("malformed handle")
        return _Remote(self, body[0], body[1][:80])

    def _note_exception_limits(self, info: dict) -> None:
        errno = info.get("errno")
        if info.get("builtin") == "MemoryError":
            self.note_limit("memory")
        elif type(errno) is int:
            self.note_limit(_ERRNO_LIMITS.get(errno))

    def _raise_remote(self, reply: dict) -> None:
        info = reply["raise"]
        if not isinstance(info, dict):
            self.fail("malformed exception")
        if reply.get("limit") == "result_size":
            self.note_limit("result_size")
        self._note_exception_limits(info)
        name, kind = str(info.get("builtin")), str(info.get("type"))[:100]
        message = str(info.get("message"))[:500]
        cls = getattr(builtins, name, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            try:
                error = cls(message if kind == name else f"{kind}: {message}")
            except Exception:
                error = Exception(f"{kind}: {message}")
            raise error
        raise _ProgramAborted(f"{kind}: {message}")

    def _apply_mutations(self, args: tuple, mutated: Any) -> None:
        if type(mutated) is not list:
            return
        for item in mutated:
            if type(item) is not list or len(item) != 2 or type(item[0]) is not int:
                self.fail("malformed mutation")
            index, data = item
            if not 0 <= index < len(args):
                continue
            try:
                new = _decode_value(data, self._proxy)
            except Exception:
                self.fail("malformed mutation")
            original = args[index]
            if type(original) is type(new) and type(original) in (list, bytearray):
                original[:] = new
            elif type(original) is type(new) and type(original) in (dict, set):
                original.clear()
                original.update(new)

    # -- transport -----------------------------------------------------------------------

    def exchange(self, message: dict) -> dict:
        if self.broken is not None:
            raise _Broken(self.broken)
        self.next_id += 1
        try:
            self._send(_frame({**message, "id": self.next_id}))
            reply = self._receive()
        except _Broken:
            raise
        except Exception as exc:
            return self.fail(f"protocol error: {type(exc).__name__}: {exc}")
        if type(reply) is not dict or reply.get("id") != self.next_id:
            self.fail("malformed or out-of-order reply")  # e.g. frames the program wrote itself
        return reply

    def _wait(self, fd: int, writing: bool) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            self.fail("the wall-clock limit was reached", "wall")
        ready = select.select([], [fd], [], remaining) if writing else select.select([fd], [], [], remaining)
        if not any(ready):
            self.fail("the wall-clock limit was reached", "wall")

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            self._wait(self.request_fd, writing=True)
            try:
                view = view[os.write(self.request_fd, view):]
            except BlockingIOError:
                continue
            except BrokenPipeError:
                self.eof = True
                self.fail("the program's process exited")

    def _receive(self) -> Any:
        (size,) = struct.unpack(">I", self._read_exact(4))
        if size > self.max_frame:  # the worker caps honest replies itself: this is garbage
            self.fail(f"malformed reply: {size} bytes announced")
        try:
            return _parse_json(self._read_exact(size).decode("utf-8"))
        except Exception as exc:
            return self.fail(f"malformed reply: {type(exc).__name__}")

    def _read_exact(self, size: int) -> bytes:
        chunks, remaining = [], size
        while remaining:
            self._wait(self.reply_fd, writing=False)
            chunk = os.read(self.reply_fd, min(remaining, 1 << 20))
            if not chunk:
                self.eof = True
                self.fail("the program's process exited or closed its channel")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)


# -- starting and stopping the worker (harness side) -------------------------------------------


class _JsonContext:
    """Settings for the C JSON scanner (importing json itself would pull in re: ~9 ms a run)."""

    strict = False
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo: dict = {}

    @staticmethod
    def parse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not allowed")


def _parse_json(text: str) -> Any:
    """Strict JSON parsing of untrusted text: one value, nothing before or after it."""
    value, end = _json.make_scanner(_JsonContext())(text, 0)
    if end != len(text):
        raise ValueError("trailing data")
    return value


class _Pipes:
    """The two pipes between harness and worker; the worker gets them as fds 3 and 4."""

    def __init__(self) -> None:
        self.request_r, self.request_w = os.pipe()
        self.reply_r, self.reply_w = os.pipe()

    def close_worker_ends(self) -> None:
        os.close(self.request_r)
        os.close(self.reply_w)


class _StatusReader:
    """Frames from init (namespaces level): first readiness, later how the worker ended."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buffer = fd, b""

    def read(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while len(self.buffer) < 4 or len(self.buffer) < 4 + struct.unpack(">I", self.buffer[:4])[0]:
            if not select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buffer += chunk
        size = struct.unpack(">I", self.buffer[:4])[0]
        message, self.buffer = marshal.loads(self.buffer[4:4 + size]), self.buffer[4 + size:]
        return message


class _Worker:
    """The harness's hold on the untrusted side: where to talk, whom to kill, how it ended."""

    def __init__(self, pid: int, pipes: _Pipes, features: list[str], status: _StatusReader | None = None,
                 keep_fds: tuple[int, ...] = ()) -> None:
        self.pid, self.features, self.status = pid, features, status
        self.request_fd, self.reply_fd = pipes.request_w, pipes.reply_r
        self.keep_fds = keep_fds  # held open until we exit: init watches one for our death

    def stop(self, eof: bool, cpu_limit: float) -> tuple[str | None, str]:
        """Kill what is left and say how the worker ended: (limit that fired, description)."""
        grace = 0.5 if eof else 0.0  # the worker hung up: give its exit a moment to be seen
        if self.status is not None:
            report = self.status.read(grace)
            _kill_and_reap(self.pid)  # PID 1 of the namespace: the kernel kills all the rest
            if report and "exit" in report and report["exit"] is not None:
                return _exit_summary(report["exit"], report["cpu"], cpu_limit)
            return None, "stopped by the harness"
        waited = _wait_for(self.pid, grace)
        if waited is None:
            _kill_and_reap(self.pid)
            return None, "stopped by the harness"
        return _exit_summary(*waited, cpu_limit)


def _kill_and_reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _wait_for(pid: int, timeout: float) -> tuple[int, float] | None:
    deadline = time.monotonic() + timeout
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done == pid:
            return status, usage.ru_utime + usage.ru_stime
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


def _exit_summary(status: int, cpu: float, cpu_limit: float) -> tuple[str | None, str]:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        names = [name for name in dir(signal) if name.startswith("SIG") and getattr(signal, name) == number]
        name = min(names, key=len) if names else str(number)
        limit = None
        if number == signal.SIGXCPU or (number == signal.SIGKILL and cpu >= cpu_limit - 0.05):
            limit = "cpu"
        elif number == signal.SIGXFSZ:
            limit = "file_size"
        return limit, f"killed by {name} after {cpu:.2f}s CPU"
    return None, f"exited with code {os.WEXITSTATUS(status)} after {cpu:.2f}s CPU"


def _start_worker(request: dict) -> _Worker:
    level = request["level"]
    if level == "namespaces":
        worker = _start_namespaced(request)
    elif level == "uid":
        if os.geteuid() != 0:
            raise PermissionError("the uid level needs root")
        worker = _start_plain(request, setuid=True)
    elif level == "audit":
        worker = _start_plain(request, setuid=False)
    else:
        raise ValueError(f"unknown level {level!r}")
    os.close(request["out_fd"])  # only the worker writes there now
    os.close(request["err_fd"])
    return worker


def _start_namespaced(request: dict) -> _Worker:
    if os.uname().machine not in SYS_PIVOT_ROOT:
        raise OSError(f"no pivot_root syscall number known for {os.uname().machine}")
    rootless = os.geteuid() != 0
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    _check(_libc().unshare(flags | (CLONE_NEWUSER if rootless else 0)), "unshare")
    if rootless:
        _map_root(uid, gid)
    pipes = _Pipes()
    status_r, status_w = os.pipe()
    alive_r, alive_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        _init_main(request, pipes, status_w, alive_r, rootless)  # never returns
    pipes.close_worker_ends()
    os.close(status_w)
    os.close(alive_r)
    status = _StatusReader(status_r)
    report = status.read(timeout=30.0)
    if not report or report.get("ready") is not True:
        _kill_and_reap(pid)
        raise OSError((report or {}).get("error", "init did not report"))
    features = report["features"] + ["user" if rootless else "uid", "rlimits"]
    return _Worker(pid, pipes, features, status, keep_fds=(alive_w,))


def _map_root(uid: int, gid: int) -> None:
    """Unprivileged: become root inside the new user namespace (and only there)."""
    _prctl(PR_SET_DUMPABLE, 1)  # a non-dumpable process cannot write its own /proc/self maps
    try:
        for name, text in (("setgroups", "deny"), ("gid_map", f"0 {gid} 1"), ("uid_map", f"0 {uid} 1")):
            with open(f"/proc/self/{name}", "w") as handle:
                handle.write(text)
    finally:
        _prctl(PR_SET_DUMPABLE, 0)  # no worker exists yet: nothing could have looked meanwhile


def _init_main(request: dict, pipes: _Pipes, status_w: int, alive_r: int, rootless: bool) -> None:
    """PID 1 of the run's PID namespace: build the root, start the worker, reap, report."""
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if select.select([alive_r], [], [], 0)[0]:
            os._exit(1)  # the harness died before the line above took effect
        _prctl(PR_SET_DUMPABLE, 0)  # the worker must not ptrace or read us
        devnull = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)  # drop the harness's stdio
        keep = {devnull, status_w, pipes.request_r, pipes.reply_w, request["out_fd"], request["err_fd"]}
        _close_all_but(keep | {0, 1, 2})  # the harness's event pipe above all
        _check(_libc().unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        features = _build_root(request)
        worker = os.fork()
        if worker == 0:
            drop = "caps" if rootless else "setuid"
            nproc = request["limits"]["processes"] + (3 if rootless else 0)
            os.setsid()  # kill(0) signals the caller's process group even across PID namespaces
            _exec_worker(request, pipes, devnull, "/tmp", drop=drop, guard=None, nproc=nproc, pdeathsig=False)
        _write_line(status_w, {"ready": True, "features": features})
        status, cpu = _reap_until(worker)
        _write_line(status_w, {"exit": status, "cpu": cpu})
    except BaseException as exc:
        try:
            _write_line(status_w, {"error": f"{type(exc).__name__}: {exc}"})
        finally:
            os._exit(1)
    os._exit(0)


def _close_all_but(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        if int(name) not in keep:
            try:
                os.close(int(name))
            except OSError:
                pass  # the descriptor listdir itself used


def _write_line(fd: int, message: dict) -> None:
    _write_all(fd, _frame(message))


def _reap_until(worker: int) -> tuple[int | None, float]:
    """Reap every child (orphans are re-parented to us) until the worker itself has exited."""
    while True:
        try:
            pid, status, usage = os.wait4(-1, 0)
        except ChildProcessError:
            return None, 0.0
        except InterruptedError:
            continue
        if pid == worker:
            return status, usage.ru_utime + usage.ru_stime


def _build_root(request: dict) -> list[str]:
    """Mount a minimal root on the run directory and pivot into it: a tmpfs holding read-only
    binds of Python and the system libraries, a small /dev, a private size-capped /tmp, /proc."""
    root = request["run_dir"]
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for path in request["binds"]:
        _bind_into(root, path)
    _make_dev(root)
    os.mkdir(root + "/tmp")
    tmp_options = f"mode=1777,size={request['limits']['tmp_mb']}m,nr_inodes=8192"
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, tmp_options)
    features = ["net", "mount", "pid", "ipc", "uts", "tmpfs"]
    os.mkdir(root + "/proc")
    try:
        _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        features.append("proc")
    except OSError:
        pass  # a user namespace cannot mount proc where the host's /proc is partly masked
    os.chdir(root)
    _check(_libc().syscall(SYS_PIVOT_ROOT[os.uname().machine], b".", b"."), "pivot_root")
    _check(_libc().umount2(b".", MNT_DETACH), "umount2(old root)")
    os.chdir("/")
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    return features


def _bind_into(root: str, path: str) -> None:
    target = root + path
    if os.path.islink(path):  # e.g. /lib -> usr/lib on merged-/usr systems
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.symlink(os.readlink(path), target)
        return
    if os.path.isdir(path):
        os.makedirs(target, exist_ok=True)
    elif os.path.exists(path):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "x").close()
    else:
        return
    _mount(path, target, None, MS_BIND | MS_REC)
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | _kept_flags(path))


def _kept_flags(path: str) -> int:
    """Flags a remount must repeat: in a user namespace the kernel refuses to drop them."""
    flags = os.statvfs(path).f_flag
    kept = MS_NOEXEC if flags & os.ST_NOEXEC else 0
    if flags & os.ST_NOATIME:
        kept |= MS_NOATIME
    elif flags & os.ST_RELATIME:
        kept |= MS_RELATIME
    else:
        kept |= MS_STRICTATIME
    if flags & os.ST_NODIRATIME:
        kept |= MS_NODIRATIME
    return kept


def _make_dev(root: str) -> None:
    dev = root + "/dev"
    os.mkdir(dev)
    _mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k")
    for name in ("null", "zero", "full", "random", "urandom"):
        if os.path.exists("/dev/" + name):
            open(f"{dev}/{name}", "x").close()
            _mount("/dev/" + name, f"{dev}/{name}", None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(dev + "/shm")
    os.chmod(dev + "/shm", 0o1777)


def _start_plain(request: dict, setuid: bool) -> _Worker:
    workdir = request["run_dir"]
    if setuid:
        os.chown(workdir, request["uid"], request["uid"])
    pipes = _Pipes()
    devnull = os.open(os.devnull, os.O_RDWR)
    guard = {"read": request["read_roots"] + [workdir], "write": [workdir], "denied": GUARD_DENIED_EVENTS,
             "denied_imports": GUARD_DENIED_IMPORTS, "writes": GUARD_WRITE_EVENTS, "reads": GUARD_READ_EVENTS}
    nproc = request["limits"]["processes"] if setuid else None  # same uid as the caller: no
    pid = os.fork()
    if pid == 0:
        _exec_worker(request, pipes, devnull, workdir, drop="setuid" if setuid else None,
                     guard=guard, nproc=nproc, pdeathsig=True)
    pipes.close_worker_ends()
    os.close(devnull)
    return _Worker(pid, pipes, ["rlimits", "guard"] + (["uid"] if setuid else []))


def _exec_worker(request: dict, pipes: _Pipes, devnull: int, workdir: str, *, drop: str | None,
                 guard: dict | None, nproc: int | None, pdeathsig: bool) -> None:
    """In the forked child: wire fds, drop privileges, apply limits, exec the worker. Never
    returns."""
    try:
        _install_worker_fds([devnull, request["out_fd"], request["err_fd"], pipes.request_r, pipes.reply_w])
        _drop_capabilities()  # also for root: nothing to regain even through a setuid binary
        if drop == "setuid":
            uid = request["uid"]
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)  # setuid binaries in the bound /usr grant nothing
        if pdeathsig:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # set after setuid, which clears it
        _apply_rlimits(request["limits"], nproc)
        os.chdir(workdir)
        config = {"guard": guard, "result_bytes": request["limits"]["result_bytes"]}
        argv = [request["python"], "-s", "-S", "-c", *request["worker_code"], f"--run-id={request['run_id']}",
                binascii.b2a_base64(marshal.dumps(config), newline=False).decode()]
        os.execve(request["python"], argv, _worker_env(workdir))
    except BaseException as exc:
        try:
            os.write(2, f"sandbox: could not start the worker: {type(exc).__name__}: {exc}\n".encode())
        finally:
            os._exit(127)


def _install_worker_fds(sources: list[int]) -> None:
    """sources[i] becomes fd i (stdin, stdout, stderr, requests, replies); all else is closed."""
    import fcntl

    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 64) for fd in sources]
    for target, fd in enumerate(high):
        os.dup2(fd, target)
    os.closerange(len(sources), 1 << 20)


def _drop_capabilities() -> None:
    """Empty the bounding set: then even uid 0 (in a user namespace) execs with no capability."""
    for cap in range(64):
        try:
            _prctl(PR_CAPBSET_DROP, cap)
        except OSError as exc:
            if exc.errno in (1, 22):  # EPERM: we hold no capabilities; EINVAL: past the last one
                break
            raise


def _apply_rlimits(limits: dict, nproc: int | None) -> None:
    import resource  # already loaded by the harness: nothing is read from disk after setuid

    cpu = max(1, -int(-limits["cpu_s"] // 1))  # whole seconds, rounded up
    wanted = [
        (resource.RLIMIT_CPU, cpu, cpu + 1),  # soft: SIGXCPU; hard one second later: SIGKILL
        (resource.RLIMIT_AS, limits["memory_mb"] << 20, limits["memory_mb"] << 20),
        (resource.RLIMIT_FSIZE, limits["file_size_mb"] << 20, limits["file_size_mb"] << 20),
        (resource.RLIMIT_NOFILE, limits["open_files"], limits["open_files"]),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    if nproc is not None:
        wanted.append((resource.RLIMIT_NPROC, nproc, nproc))
    for which, soft, hard in wanted:
        current = resource.getrlimit(which)[1]
        if current != resource.RLIM_INFINITY:
            hard = min(hard, current)
        resource.setrlimit(which, (min(soft, hard), hard))


def _worker_env(workdir: str) -> dict[str, str]:
    """The worker's whole environment: nothing of the caller's (no tokens, no keys)."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUTF8": "1",
    }


# The harness stops reading this file here: the rest is the caller's side and the public
# records, which import dataclasses, typing and ast (together ~30 ms per harness process).
if __name__ == "__posttrain_harness__":
    _harness_main()
    os._exit(0)


# ============================================================================================
# Public records and the caller's side: spawn the harness, pump its pipes, enforce the
# backstop, clean up.
# ============================================================================================

import ast  # noqa: E402  (kept below the harness's exit, see above)
import functools  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Literal  # noqa: E402

IsolationLevel = Literal["auto", "namespaces", "uid", "audit"]
LEVELS: tuple[str, ...] = ("namespaces", "uid", "audit")  # strongest first


@dataclass(frozen=True)
class SandboxLimits:
    """What one run may use. Every limit applies to the whole run, not to each test."""

    wall_s: float = 10.0  # wall clock for the program and all its tests
    cpu_s: float = 5.0  # CPU seconds of the worker process (RLIMIT_CPU)
    memory_mb: int = 1024  # address space of each process (RLIMIT_AS)
    file_size_mb: int = 16  # largest file the program may write (RLIMIT_FSIZE)
    tmp_mb: int = 64  # size of the private /tmp ("namespaces" level; elsewhere a host temp dir)
    processes: int = 16  # processes + threads of the run's uid (RLIMIT_NPROC)
    open_files: int = 64  # file descriptors per process (RLIMIT_NOFILE)
    output_bytes: int = 1 << 20  # stdout + stderr; the run is killed beyond this
    result_bytes: int = 8 << 20  # largest value one call may return
    isolation: IsolationLevel = "auto"  # "auto" = the strongest level that works here


@dataclass(frozen=True)
class SandboxRequest:
    """A program and its tests, in one of two styles.

    ``tests``: statements (usually ``assert f(x) == y``), each one test, run in one shared scope.
    ``check``: source defining ``check(candidate)`` (HumanEval); ``entry_point`` names the
    program's function passed as ``candidate``; each top-level statement of ``check`` that holds
    a non-trivial assert is one test. ``prelude`` is trusted code run in the test scope first
    (HumanEval's prompt, whose helpers the tests call). ``setup`` runs in the worker after the
    program (MBPP's ``test_setup_code`` builds objects with the program's classes).
    """

    program: str
    tests: tuple[str, ...] | None = None
    check: str | None = None
    entry_point: str | None = None
    setup: str = ""
    prelude: str = ""


@dataclass
class SandboxResult:
    """What the harness saw. ``passed[i]`` is True only if the harness watched test i pass."""

    passed: list[bool] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    loaded: bool = False  # the program's top level ran without raising
    load_error: str | None = None
    limit: str | None = None  # "wall" | "cpu" | "memory" | "output" | "file_size" | ...
    level: str = ""  # the isolation level used
    isolation: str = ""  # "strong" | "weak"
    features: list[str] = field(default_factory=list)
    worker_exit: str | None = None
    stdout_tail: str = ""
    stderr_tail: str = ""
    output_bytes: int = 0
    error: str | None = None  # the sandbox itself failed: the program is not to blame
    wall_s: float = 0.0
    run_id: str = ""


class SandboxUnavailable(RuntimeError):
    """The requested isolation level cannot be set up on this machine."""



# Run as `python -s -S -c _BOOTSTRAP sandbox.py`. Loading by file location rather than as a
# script keeps this file's folder off sys.path (it holds math.py and code.py, which would shadow
# the standard library) and reuses the cached bytecode; the frozen importlib needs no imports.
_BOOTSTRAP = (
    "import sys\n"
    "sys.path.pop(0)\n"
    "e, b = sys.modules['_frozen_importlib_external'], sys.modules['_frozen_importlib']\n"
    "s = e.spec_from_file_location('__posttrain_harness__', sys.argv[1])\n"
    "m = b.module_from_spec(s)\n"
    "sys.modules[s.name] = m\n"
    "s.loader.exec_module(m)\n"
)
# Run as the worker when it is this same interpreter: the worker's code arrives compiled.
_WORKER_BOOT = "import sys, marshal, binascii\nexec(marshal.loads(binascii.a2b_base64(sys.argv[1])))\n"
_UID_BASE, _UID_SPAN = 0x40000000, 0x3FFF0000  # per-run uids, far above any real account
_TAIL_BYTES = 4000
_STARTUP_GRACE_S = 10.0
_CACHE: dict[Any, Any] = {}
_PROBES: dict[tuple[str, str], str | None] = {}  # (level, python) -> None if it works, else why not

# The worker's interpreter; None = the real interpreter behind this one. At the "uid" level it
# must be executable by an unprivileged uid (a Python under /root is not).
WORKER_PYTHON: str | None = None


def run_program(request: SandboxRequest, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``request.program`` against its tests in a fresh sandbox; never raises for anything
    the program does (a sandbox that cannot start sets ``result.error``)."""
    limits = limits or SandboxLimits()
    return _run(request, limits, resolve_isolation(limits.isolation))


def run_programs(requests: list[SandboxRequest], limits: SandboxLimits | None = None, *,
                 max_workers: int | None = None) -> list[SandboxResult]:
    """Run many requests, at most ``max_workers`` (default: usable CPUs) at a time, in order."""
    from concurrent.futures import ThreadPoolExecutor

    limits = limits or SandboxLimits()
    level = resolve_isolation(limits.isolation)  # probe once, before the threads start
    workers = max(1, max_workers or default_concurrency())
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="posttrain-sandbox") as pool:
        return list(pool.map(lambda request: _run(request, limits, level), requests))


def default_concurrency() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_isolation(requested: str) -> str:
    """The level to use: ``requested`` itself, or for "auto" the strongest that works here.
    Raises SandboxUnavailable, with the reason, when none does."""
    if requested == "auto":
        for level in LEVELS:
            if probe_isolation(level) is None:
                return level
        reasons = "; ".join(f"{level}: {probe_isolation(level)}" for level in LEVELS)
        raise SandboxUnavailable(f"no sandbox isolation level works here ({reasons})")
    if requested not in LEVELS:
        raise ValueError(f"unknown isolation {requested!r}; valid: auto, {', '.join(LEVELS)}")
    reason = probe_isolation(requested)
    if reason is not None:
        raise SandboxUnavailable(f"isolation {requested!r} is unavailable here: {reason}")
    return requested


def probe_isolation(level: str) -> str | None:
    """None if ``level`` works on this machine, else why not. Tried once per process."""
    import threading

    lock = _CACHE.setdefault("probe_lock", threading.Lock())
    key = (level, _interpreter())
    with lock:
        if key not in _PROBES:
            _PROBES[key] = _probe(level)
        return _PROBES[key]


def _probe(level: str) -> str | None:
    if sys.platform != "linux":
        return "the sandbox needs Linux"
    if level == "uid" and os.geteuid() != 0:
        return "needs root"
    request = SandboxRequest(program="def f():\n    return 1\n", tests=("assert f() == 1",))
    result = _run(request, SandboxLimits(wall_s=30.0), level)
    if result.passed == [True] and result.error is None:
        return None
    reason = result.error or result.load_error or result.worker_exit or "the probe program failed"
    detail = result.stderr_tail.strip().splitlines()[-1:]
    return f"{reason} ({detail[0]})" if detail else reason


def _run(request: SandboxRequest, limits: SandboxLimits, level: str) -> SandboxResult:
    """One run. Whatever goes wrong on our side (no fds left, no temp dir) becomes
    ``result.error`` rather than an exception, so that one run cannot sink a batch."""
    import secrets

    collector = _Collector(secrets.token_bytes(16), secrets.token_hex(6), limits)
    try:
        tests = _prepare_tests(tuple(request.tests) if request.tests is not None else None, request.check)
    except (SyntaxError, ValueError) as exc:
        collector.error = f"bad tests: {type(exc).__name__}: {exc}"
        return collector.result(0.0)
    try:
        return _run_prepared(request, tests, limits, level, collector)
    except Exception as exc:
        collector.error = f"the sandbox failed: {type(exc).__name__}: {exc}"
        return collector.result(0.0)


def _run_prepared(request: SandboxRequest, tests: dict, limits: SandboxLimits, level: str,
                  collector: _Collector) -> SandboxResult:
    import secrets
    import shutil
    import tempfile

    started = time.monotonic()
    run_dir = os.path.realpath(tempfile.mkdtemp(prefix="posttrain-sbx-"))
    uid = _UID_BASE + secrets.randbelow(_UID_SPAN)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    message = _harness_request(request, tests, limits, level, run_dir, uid, collector, (out_w, err_w))
    proc = None
    child = _ChildWatch()
    try:
        proc = _spawn_harness((out_w, err_w))
    except OSError as exc:
        collector.error = f"cannot start the sandbox harness: {exc}"
    finally:
        os.close(out_w)
        os.close(err_w)
    try:
        if proc is not None:
            deadline = started + limits.wall_s * 1.5 + _STARTUP_GRACE_S
            _pump(proc, message, {out_r: "stdout", err_r: "stderr"}, collector, deadline, child)
    finally:
        if proc is not None:
            _reap_harness(proc)
        if not child.wait_gone(timeout=10.0):
            collector.error = collector.error or "the sandbox's processes outlived the run by 10 s"
        os.close(out_r)
        os.close(err_r)
        if level == "uid":
            _sweep_uid(uid)
        shutil.rmtree(run_dir, ignore_errors=True)
    return collector.result(time.monotonic() - started)


def _harness_request(request: SandboxRequest, tests: dict, limits: SandboxLimits, level: str, run_dir: str,
                     uid: int, collector: _Collector, out_fds: tuple[int, int]) -> bytes:
    message = {
        "nonce": collector.nonce,
        "parent_pid": os.getpid(),
        "level": level,
        "program": request.program,
        "entry_point": request.entry_point,
        "setup": request.setup,
        "prelude": request.prelude,
        "limits": asdict(limits),
        "run_dir": run_dir,
        "uid": uid,
        "out_fd": out_fds[0],
        "err_fd": out_fds[1],
        "python": _interpreter(),
        "binds": _binds(),
        "read_roots": _read_roots(),
        "worker_code": _worker_code(),
        "run_id": collector.run_id,  # public: in the worker's argv, so its processes can be found
        **tests,
    }
    return marshal.dumps(message)


# -- the tests, prepared in the caller so that the harness needs no ast -------------------------


@functools.lru_cache(maxsize=4096)
def _prepare_tests(tests: tuple[str, ...] | None, check: str | None) -> dict:
    """What the harness runs: the test statements, or check() instrumented so that each
    top-level statement asserting something is a test of its own; plus the free names."""
    sources = [check] if check is not None else list(tests or ())
    if not sources:
        raise ValueError("no tests")
    names, module_names = _free_names(sources)
    found = {"names": sorted(names), "module_names": sorted(module_names)}
    if check is not None:
        source, count, whole = _instrument_check(check)
        return {"tests": None, "check": source, "count": count, "whole": whole, **found}
    return {"tests": list(sources), "check": None, "count": len(sources), "whole": False, **found}


def _free_names(sources: list[str]) -> tuple[set[str], set[str]]:
    """Names the tests read but never bind (these come from the prelude, builtins, the standard
    library or the program), and those of them used only as the base of ``name.attr``."""
    loaded: set[str] = set()
    bound: set[str] = set()
    as_base: set[str] = set()
    otherwise: set[str] = set()
    for source in sources:
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue  # that test fails on its own when it runs
        bases = {id(node.value) for node in ast.walk(tree)
                 if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                loaded.add(node.id)
                (as_base if id(node) in bases else otherwise).add(node.id)
            elif isinstance(node, ast.Name):
                bound.add(node.id)
            elif isinstance(node, ast.arg):
                bound.add(node.arg)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bound.add(node.name)
            elif isinstance(node, ast.alias):
                bound.add((node.asname or node.name).partition(".")[0])
    free = loaded - bound
    return free, {name for name in free if name in as_base and name not in otherwise}


def _instrument_check(source: str) -> tuple[str, int, bool]:
    """Wrap each top-level statement of ``check`` that asserts something in a try/except that
    records its verdict, so that one failing assert does not hide the others.

    Returns (source, number of tests, whole) where ``whole`` means check() had no such
    statement and counts as one test. ``assert True`` and other constant asserts are not tests.
    """
    tree = ast.parse(source)
    checks = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "check"]
    if not checks:
        raise ValueError("the test source defines no check(candidate) function")
    check = checks[-1]
    body: list[ast.stmt] = []
    count = 0
    for statement in check.body:
        if _asserts_something(statement):
            body.append(ast.copy_location(_guarded(statement, count), statement))
            count += 1
        else:
            body.append(statement)
    check.body = body
    return ast.unparse(ast.fix_missing_locations(tree)), max(count, 1), count == 0


def _asserts_something(statement: ast.stmt) -> bool:
    return any(
        isinstance(node, ast.Assert) and not isinstance(node.test, ast.Constant)
        for node in ast.walk(statement)
    )


def _guarded(statement: ast.stmt, index: int) -> ast.Try:
    def record(error: ast.expr) -> ast.stmt:
        call = ast.Call(ast.Name("__posttrain_record__", ast.Load()), [ast.Constant(index), error], [])
        return ast.Expr(call)

    handler = ast.ExceptHandler(
        type=ast.Name("BaseException", ast.Load()),
        name="__posttrain_error__",
        body=[record(ast.Name("__posttrain_error__", ast.Load()))],
    )
    return ast.Try(body=[statement], handlers=[handler], orelse=[record(ast.Constant(None))], finalbody=[])


# -- spawning and watching the harness ---------------------------------------------------------


def _spawn_harness(out_fds: tuple[int, int]) -> Any:
    import subprocess

    return subprocess.Popen(
        [sys.executable, "-s", "-S", "-c", _BOOTSTRAP, os.path.realpath(__file__)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=out_fds,
        cwd="/",
        env={"PYTHONHASHSEED": "0", "LANG": "C.UTF-8"},  # nothing of ours: no secrets
        start_new_session=True,  # its own process group, killed as one
    )


def _pump(proc: Any, message: bytes, worker_fds: dict[int, str], collector: _Collector,
          deadline: float, child: _ChildWatch) -> None:
    """Feed the request, read events and output until the harness closes its stdout; kill the
    tree at the backstop deadline or when the output cap is passed."""
    import selectors

    selector = selectors.DefaultSelector()
    pending = memoryview(message)
    stdin = proc.stdin.fileno()
    streams = {proc.stdout.fileno(): "events", proc.stderr.fileno(): "diagnostics", **worker_fds}
    for fd in [stdin, *streams]:
        os.set_blocking(fd, False)
    selector.register(stdin, selectors.EVENT_WRITE)
    for fd in streams:
        selector.register(fd, selectors.EVENT_READ)
    try:
        while proc.stdout.fileno() in selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _kill_harness(proc, collector, "wall", child)
                return
            for key, _ in selector.select(remaining):
                if key.fd == stdin:
                    pending = _feed(key.fd, pending, selector, proc)
                elif not _drain(key.fd, streams[key.fd], collector, selector):
                    continue
                if collector.output_exceeded:
                    _kill_harness(proc, collector, "output", child)
                    return
    finally:
        selector.close()
    for fd, name in worker_fds.items():  # what the worker wrote before it died
        _drain(fd, name, collector, None)


def _feed(fd: int, pending: memoryview, selector: Any, proc: Any) -> memoryview:
    try:
        pending = pending[os.write(fd, pending):]
    except BlockingIOError:
        return pending
    except BrokenPipeError:
        pending = pending[:0]
    if not pending:
        selector.unregister(fd)
        proc.stdin.close()
    return pending


def _drain(fd: int, name: str, collector: _Collector, selector: Any) -> bool:
    """Read what is there (once with a selector, else until EAGAIN/EOF). False at EOF."""
    while True:
        try:
            data = os.read(fd, 65536)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        if not data:
            if selector is not None:
                selector.unregister(fd)
            return False
        collector.feed(name, data)
        if selector is not None or collector.output_exceeded:
            return True


class _ChildWatch:
    """A pidfd on the harness's one child: init at the namespaces level (it exits only once
    every process of its PID namespace is gone), the worker at the weak levels. Killing the
    harness from here (output cap, backstop clock) makes that child die soon after, not at once;
    waiting on the pidfd means a run never returns while its processes still live."""

    def __init__(self) -> None:
        self.fd: int | None = None

    def hold(self, pid: int | None, harness_pid: int) -> None:
        if pid is None:
            return
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            return  # gone already, or no pidfds (Linux < 5.3)
        if _parent_of(pid) != harness_pid:
            os.close(fd)  # reaped before we looked and the number reused: nothing of ours
            return
        self.fd = fd

    def wait_gone(self, timeout: float) -> bool:
        if self.fd is None:
            return True
        try:
            return bool(select.select([self.fd], [], [], timeout)[0])
        finally:
            os.close(self.fd)
            self.fd = None


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("PPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _kill_harness(proc: Any, collector: _Collector, limit: str, child: _ChildWatch) -> None:
    collector.trainer_limit = limit
    _drain(proc.stdout.fileno(), "events", collector, None)  # the "started" event may be unread
    child.hold(collector.state.get("started", {}).get("child"), proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # not yet reaped, so the group id is still ours
    except (ProcessLookupError, PermissionError):
        pass


def _reap_harness(proc: Any) -> None:
    import subprocess

    try:
        proc.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None and not stream.closed:
            stream.close()


def _sweep_uid(uid: int) -> None:
    """uid level (no PID namespace): kill anything still running as the run's uid."""
    for _ in range(100):
        pids = [pid for pid in _pids() if _runs_as(pid, uid)]
        if not pids:
            return
        for pid in pids:
            _kill_if_runs_as(pid, uid)
        time.sleep(0.005)


def _kill_if_runs_as(pid: int, uid: int) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError) as exc:
        if getattr(exc, "errno", None) == 3:  # ESRCH: already gone
            return
        try:  # no pidfds (Linux < 5.3): a plain kill, with the tiny pid-reuse race that implies
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
        return
    try:
        if _runs_as(pid, uid):  # the pidfd pins the process: no pid-reuse race
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(pidfd)


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _runs_as(pid: int, uid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("Uid:"):
                    return str(uid) in line.split()[1:]
    except OSError:
        pass
    return False


class _Collector:
    """Assembles a SandboxResult from the harness's events and the worker's output."""

    def __init__(self, nonce: bytes, run_id: str, limits: SandboxLimits) -> None:
        self.nonce, self.run_id, self.limits = nonce, run_id, limits
        self.events = bytearray()
        self.tails = {"stdout": bytearray(), "stderr": bytearray(), "diagnostics": bytearray()}
        self.output_bytes = 0
        self.trainer_limit: str | None = None
        self.error: str | None = None
        self.state: dict[str, Any] = {}
        self.passed: list[bool] = []
        self.errors: list[str | None] = []

    @property
    def output_exceeded(self) -> bool:
        return self.output_bytes > self.limits.output_bytes

    def feed(self, name: str, data: bytes) -> None:
        if name == "events":
            self._feed_events(data)
            return
        if name != "diagnostics":
            self.output_bytes += len(data)
        tail = self.tails[name]
        tail += data
        del tail[:-_TAIL_BYTES]

    def _feed_events(self, data: bytes) -> None:
        self.events += data
        header = len(self.nonce) + 4
        while len(self.events) >= header:
            if self.events[:len(self.nonce)] != self.nonce:
                self.error = "the harness's event stream is corrupt"
                self.events.clear()
                return
            size = struct.unpack(">I", self.events[len(self.nonce):header])[0]
            if len(self.events) < header + size:
                return
            event = marshal.loads(bytes(self.events[header:header + size]))
            del self.events[:header + size]
            self._event(event)

    def _event(self, event: dict) -> None:
        kind = event.pop("event")
        if kind == "plan":
            self.passed = [False] * event["tests"]
            self.errors = ["not run"] * event["tests"]
        elif kind == "test" and 0 <= event["index"] < len(self.passed):
            self.passed[event["index"]] = event["passed"] is True
            self.errors[event["index"]] = event["error"]
        elif kind == "error":
            self.error = event["message"]
        else:
            self.state[kind] = event

    def result(self, wall_s: float) -> SandboxResult:
        started = self.state.get("started", {})
        loaded = self.state.get("loaded", {})
        done = self.state.get("done")
        error = self.error
        if error is None and done is None and self.trainer_limit is None:
            diagnostics = self.tails["diagnostics"].decode(errors="replace").strip()
            error = "the sandbox harness ended unexpectedly" + (f": {diagnostics[-500:]}" if diagnostics else "")
        return SandboxResult(
            passed=self.passed,
            errors=self.errors,
            loaded=loaded.get("ok") is True,
            load_error=loaded.get("error"),
            limit=self.trainer_limit or (done or {}).get("limit"),
            level=started.get("level", ""),
            isolation=started.get("isolation", ""),
            features=started.get("features", []),
            worker_exit=(done or {}).get("worker_exit"),
            stdout_tail=self.tails["stdout"].decode(errors="replace"),
            stderr_tail=self.tails["stderr"].decode(errors="replace"),
            output_bytes=self.output_bytes,
            error=error,
            wall_s=wall_s,
            run_id=self.run_id,
        )


# -- what the worker runs, and what it may see -------------------------------------------------


def _interpreter() -> str:
    """The worker's Python: WORKER_PYTHON, else the real interpreter behind this one (a venv's
    python is a symlink, and the venv's packages are not the program's business)."""
    return os.path.realpath(WORKER_PYTHON or sys.executable)


def _python_prefixes() -> list[str]:
    python = _interpreter()
    prefixes = {os.path.dirname(os.path.dirname(python))}  # <prefix>/bin/python3.x
    if python == os.path.realpath(sys.executable):
        prefixes |= {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}
    return sorted(prefixes)


def _read_roots() -> list[str]:
    """What the guard lets the worker read at the weak levels: Python and a few devices."""
    extra = ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/usr/share/zoneinfo", "/etc/localtime"]
    return _python_prefixes() + extra


def _binds() -> list[str]:
    """Host paths bound read-only into the namespaces root: system libraries and Python."""
    key = ("binds", _interpreter())
    if key not in _CACHE:
        wanted = ["/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin", "/etc/ld.so.cache",
                  "/etc/localtime", *_python_prefixes(), os.path.dirname(_interpreter())]
        real_dirs = [p for p in wanted if os.path.isdir(p) and not os.path.islink(p)]
        kept = []
        for path in dict.fromkeys(wanted):
            covered = any(path != other and path.startswith(other.rstrip("/") + "/") for other in real_dirs)
            if os.path.lexists(path) and not covered:
                kept.append(path)
        _CACHE[key] = kept
    return list(_CACHE[key])


def _worker_code() -> list[str]:
    """The ``-c`` arguments that start the worker: its code compiled once here when it runs on
    this same interpreter (saves compiling it in every run), else its source."""
    key = ("worker", _interpreter())
    if key not in _CACHE:
        import inspect

        parts = [_WORKER_PREAMBLE] + [inspect.getsource(function) for function in _WORKER_FUNCTIONS]
        source = "\n\n".join(parts) + "\n\n_worker_main()\n"
        if _interpreter() != os.path.realpath(sys.executable):
            _CACHE[key] = [source]
        else:
            code = marshal.dumps(compile(source, "<posttrain sandbox worker>", "exec"))
            _CACHE[key] = [_WORKER_BOOT, binascii.b2a_base64(code, newline=False).decode()]
    return list(_CACHE[key])
