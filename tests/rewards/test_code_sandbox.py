"""The sandboxed code verifier: honest programs pass, real datasets pass, and hostile programs
are contained at every isolation level this machine offers.

Attack tests share one task: ``f(x)`` must return ``x + 1`` on three inputs, which no constant
can satisfy. Each hostile program tries its trick instead of (or as well as) computing, and
must score 0 with the host untouched and nothing of the run left running. Levels that cannot
run here are skipped with the reason; the namespaces level needs Linux namespaces (root, or
unprivileged user namespaces).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from posttrain.errors import UserError
from posttrain.rewards.verifiers import sandbox
from posttrain.rewards.verifiers.code import (
    build_request,
    extract_code,
    humaneval_program,
    infer_entry_point,
    register,
    verify_code,
    verify_code_batch,
)
from posttrain.rewards.verifiers.sandbox import SandboxLimits
from posttrain.types import RewardResult

REPO = Path(__file__).resolve().parents[2]
TESTS = ["assert f(1) == 2", "assert f(5) == 6", "assert f(-3) == -2"]
HONEST = "def f(x):\n    return x + 1\n"
FAST = SandboxLimits(wall_s=5.0, cpu_s=1.0, memory_mb=256, processes=16)
SECRET = "hunter2-posttrain-fake-secret"

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux")


# -- fixtures and helpers -----------------------------------------------------------------------


def _world_executable_python() -> str | None:
    """A Python an unprivileged uid can run (the uid level needs one; /root/... is not)."""
    for candidate in (f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}", "/usr/bin/python3",
                      "/usr/local/bin/python3"):
        if os.path.exists(candidate) and os.stat(candidate).st_mode & 0o001:
            return candidate
    return None


@pytest.fixture(params=sandbox.LEVELS)
def level(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each isolation level that works here; the uid level may need a world-executable Python."""
    name = request.param
    reason = sandbox.probe_isolation(name)
    if reason is not None and name == "uid" and _world_executable_python():
        monkeypatch.setattr(sandbox, "WORKER_PYTHON", _world_executable_python())
        reason = sandbox.probe_isolation(name)
    if reason is not None:
        pytest.skip(f"isolation {name!r} unavailable here: {reason}")
    return name


def attack(program: str, level: str, tests: list[str] | None = None, **limits: object) -> RewardResult:
    settings = dataclasses.replace(FAST, isolation=level, **limits)
    return verify_code(textwrap.dedent(program), {"tests": tests or TESTS}, limits=settings)


def cmdlines() -> dict[int, str]:
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                found[int(name)] = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                pass
    return found


def survivors(result: RewardResult, *tokens: str) -> list[str]:
    """Processes of this run still alive: the worker and its forks carry --run-id in argv."""
    marks = (f"--run-id={result.meta['run_id']}", *tokens)
    return [cmd for pid, cmd in cmdlines().items() if pid != os.getpid() and any(mark in cmd for mark in marks)]


def assert_contained(result: RewardResult, *tokens: str, limits: set[str | None] | None = None) -> None:
    assert result.score == 0.0, result.meta
    assert "error" not in result.meta, result.meta
    assert not survivors(result, *tokens)
    if limits is not None:
        assert result.meta["limit"] in limits, result.meta


def in_throwaway_pid_namespace(code: str) -> dict:
    """Run ``code`` (which prints one JSON line) as PID 1 of a fresh PID namespace, for the
    attacks that could harm the host if the weak level's guard ever failed."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to run this attack safely at the audit level")
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    command = ["unshare", *user, "--pid", "--fork", "--kill-child", sys.executable, "-c", code]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 and "unshare" in done.stderr and "Operation not permitted" in done.stderr:
        pytest.skip(f"cannot create a PID namespace here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def attack_in_namespace(program: str, level: str) -> dict:
    """``attack`` inside a throwaway PID namespace, with a canary process beside it."""
    code = f"""
import json, subprocess, dataclasses
from posttrain.rewards.verifiers import sandbox
from posttrain.rewards.verifiers.code import verify_code
sandbox.WORKER_PYTHON = {sandbox.WORKER_PYTHON!r}
canary = subprocess.Popen(["sleep", "60"])
limits = dataclasses.replace(sandbox.SandboxLimits(wall_s=5.0, cpu_s=1.0, memory_mb=256), isolation={level!r})
result = verify_code({textwrap.dedent(program)!r}, {{"tests": {TESTS!r}}}, limits=limits)
alive = canary.poll() is None
canary.kill()
print(json.dumps({{"score": result.score, "meta": result.meta, "canary_alive": alive}}))
"""
    return in_throwaway_pid_namespace(code)


@pytest.fixture
def listener():
    """A TCP listener on the host's loopback that records whatever connects to it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.05)
    received: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                continue
            received.append(connection.recv(100) or b"<connected>")
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], received
    stop.set()
    thread.join()
    server.close()


# -- extraction, rows, registry -------------------------------------------------------------------


def test_extract_code_prefers_the_first_python_fence() -> None:
    text = "Here:\n```text\nnot code\n```\n```python\ndef f():\n    return 1\n```\n```python\nx = 2\n```"
    assert extract_code(text) == "def f():\n    return 1\n"
    assert extract_code("```\nplain = 1\n```") == "plain = 1\n"
    assert extract_code("```py\ny = 1\n") == "y = 1\n"  # unclosed fence runs to the end
    assert extract_code("def g():\n    return 2\n") == "def g():\n    return 2\n"


def test_humaneval_program_continues_the_prompt_or_replaces_the_stub() -> None:
    prompt = 'def add(a, b):\n    """Add."""\n'
    assert humaneval_program("    return a + b\n", prompt, "add") == prompt + "    return a + b\n"
    full = humaneval_program("def add(a, b):\n    return a + b\n", prompt, "add")
    assert full.startswith(prompt.rstrip("\n")) and full.endswith("def add(a, b):\n    return a + b\n")


def test_entry_point_is_inferred_past_builtins() -> None:
    assert infer_entry_point(["assert set(similar(1, 2)) == {1}"]) == "similar"
    assert infer_entry_point(["assert sum(10, 15) == 6"]) == "sum"  # MBPP 126 shadows a builtin
    assert infer_entry_point(["assert math.isclose(area(2), 4.0)"]) == "area"


def test_bad_rows_raise_user_errors() -> None:
    with pytest.raises(UserError, match="tests"):
        build_request("x = 1", {"tests": "assert f(1) == 2"})
    with pytest.raises(UserError, match="entry_point"):
        build_request("x = 1", {"test": "def check(candidate):\n    pass\n"})


def test_register_adds_code_to_a_registry() -> None:
    from posttrain.registry import Registry

    registry: Registry = Registry("verifier")
    register(registry)
    result = registry.get("code")(HONEST, {"tests": TESTS, "all_or_nothing": True})
    assert result.score == 1.0


# -- honest programs ------------------------------------------------------------------------------


HONEST_STDLIB = '''
import collections, itertools, json, re, tempfile, os, time, math, heapq, functools

def f(x):
    start = time.process_time()
    spin = 0
    while time.process_time() - start < 1.0:  # a second of CPU
        spin += 1
    with tempfile.NamedTemporaryFile("w+", suffix=".json", delete=False) as handle:
        json.dump({"x": x}, handle)
    with open(handle.name) as again:
        value = json.load(again)["x"]
    os.remove(handle.name)
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "a.txt"), "w") as out:
            out.write("1")
    counts = collections.Counter(re.findall(r"\\d", str(abs(value))))
    assert counts and list(itertools.islice(itertools.count(), 2)) == [0, 1] and heapq.nsmallest(1, [3, 1]) == [1]
    assert functools.reduce(lambda a, b: a + b, [1, 2]) == 3 and math.isqrt(16) == 4
    return value + 1
'''


def test_honest_program_with_stdlib_tempfiles_and_a_cpu_second_scores_one(level: str) -> None:
    limits = SandboxLimits(isolation=level, cpu_s=5.0, wall_s=30.0)
    result = verify_code(HONEST_STDLIB, {"tests": ["assert f(1) == 2"]}, limits=limits)
    assert result.score == 1.0, result.meta
    assert result.meta["isolation"] == ("strong" if level == "namespaces" else "weak")


def test_partial_credit_all_or_nothing_and_meta(level: str) -> None:
    row = {"tests": TESTS}
    program = "def f(x):\n    return 2\n"  # right for f(1) only
    limits = dataclasses.replace(FAST, isolation=level)
    partial = verify_code(program, row, limits=limits)
    strict = verify_code(program, row, all_or_nothing=True, limits=limits)
    assert partial.score == pytest.approx(1 / 3) and strict.score == 0.0
    assert partial.components == {"pass_rate": pytest.approx(1 / 3), "all_passed": 0.0}
    assert [test["passed"] for test in partial.meta["tests"]] == [True, False, False]
    assert partial.meta["isolation_level"] == level and partial.meta["limit"] is None


def test_auto_falls_back_and_flags_weak_when_namespaces_are_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    """What CI without namespaces sees: "auto" takes the next level and meta says weak."""
    monkeypatch.setitem(sandbox._PROBES, ("namespaces", sandbox._interpreter()), "simulated: no namespaces")
    monkeypatch.setitem(sandbox._PROBES, ("uid", sandbox._interpreter()), "simulated: not root")
    if sandbox.probe_isolation("audit") is not None:
        pytest.skip("the audit level does not work here either")
    result = verify_code(HONEST, {"tests": TESTS}, limits=FAST)
    assert result.score == 1.0 and result.meta["isolation"] == "weak" and result.meta["isolation_level"] == "audit"
    with pytest.raises(UserError, match="simulated: no namespaces"):
        verify_code(HONEST, {"tests": TESTS}, limits=dataclasses.replace(FAST, isolation="namespaces"))


def test_syntax_error_scores_zero_with_a_reason() -> None:
    result = verify_code("def f(x) return x", {"tests": TESTS}, limits=FAST)
    assert result.score == 0.0 and "SyntaxError" in result.meta["reason"]


def test_batch_keeps_order() -> None:
    programs = [HONEST, "def f(x):\n    return 0\n", HONEST]
    results = verify_code_batch(programs, [{"tests": TESTS}] * 3, limits=FAST, max_workers=2)
    assert [r.score for r in results] == [1.0, 0.0, 1.0]


def test_values_cross_the_boundary_faithfully() -> None:
    program = '''
    import collections
    def f(kind):
        return {
            "tuple": (1, "a", None), "set": {1, 2}, "dict": {(1, 2): [3.5]}, "bytes": b"\\x00\\xff",
            "counter": collections.Counter("aab"), "big": 2 ** 200, "nan": float("nan"), "neg": -7,
            "complex": 1 + 2j, "type": int, "nested": [[{"k": frozenset([1])}]], "surrogate": "\\udc80",
        }[kind]
    def g(values):
        values.append(4)  # mutates its argument in place
    '''
    tests = [
        "assert f('tuple') == (1, 'a', None) and type(f('tuple')) is tuple",
        "assert f('set') == {1, 2} and f('dict') == {(1, 2): [3.5]} and f('bytes') == b'\\x00\\xff'",
        "assert f('counter') == {'a': 2, 'b': 1} and f('big') == 2 ** 200 and f('neg') == -7",
        "assert f('nan') != f('nan') and f('complex') == 1 + 2j and f('type') is int",
        "assert f('nested') == [[{'k': frozenset([1])}]] and f('surrogate') == '\\udc80'",
        "v = [1, 2, 3]; g(v); assert v == [1, 2, 3, 4]",
    ]
    result = verify_code(textwrap.dedent(program), {"tests": tests}, limits=FAST)
    assert result.score == 1.0, result.meta


def test_objects_stay_in_the_worker_but_work_through_proxies() -> None:
    program = '''
    class Node:
        def __init__(self, value, children=()):
            self.value, self.children = value, list(children)
    def depth(node):
        return 1 + max((depth(child) for child in node.children), default=0)
    def numbers(n):
        return (i * i for i in range(n))
    '''
    setup = "tree = Node(1, [Node(2, [Node(3)]), Node(4)])"
    tests = ["assert depth(tree) == 3", "assert tree.value == 1", "assert list(numbers(4)) == [0, 1, 4, 9]",
             "assert depth(Node(5)) == 1"]
    result = verify_code(textwrap.dedent(program), {"tests": tests, "setup": setup}, limits=FAST)
    assert result.score == 1.0, result.meta


def test_exceptions_cross_as_builtin_types() -> None:
    program = '''
    class Bad(ValueError):
        pass
    def f(x):
        if x < 0:
            raise Bad("negative")
        return x + 1
    '''
    tests = ["try:\n    f(-1)\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError('no error')",
             "assert f(1) == 2"]
    result = verify_code(textwrap.dedent(program), {"tests": tests}, limits=FAST)
    assert result.score == 1.0, result.meta


# -- the attack suite ---------------------------------------------------------------------------
# Every attack runs at every available level. Where an attack would hurt the host if the weak
# "audit" level's guard ever failed (its worker runs as the caller's own uid), that level runs it
# inside a throwaway PID namespace with a canary process beside it.


def test_infinite_loop_hits_the_cpu_limit(level: str) -> None:
    result = attack("while True:\n    pass\n", level, wall_s=20.0)  # wall: slack for a loaded machine
    assert_contained(result, limits={"cpu"})


def test_sleeping_hits_the_wall_limit(level: str) -> None:
    result = attack("import time\ndef f(x):\n    time.sleep(60)\n", level, wall_s=1.5)
    assert_contained(result, limits={"wall"})


def test_loop_ignoring_sigterm_and_sigxcpu_is_killed(level: str) -> None:
    program = """
    import signal
    for sig in (signal.SIGTERM, signal.SIGXCPU, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    def f(x):
        while True:
            pass
    """
    assert_contained(attack(program, level, wall_s=20.0), limits={"cpu"})


def test_memory_bomb_hits_the_memory_limit(level: str) -> None:
    program = """
    hoard = []
    while True:
        hoard.append(bytearray(16 << 20))
    """
    assert_contained(attack(program, level), limits={"memory"})


FORK_BOMB = """
import os
while True:
    os.fork()
"""


def test_fork_bomb_is_contained(level: str) -> None:
    if level == "audit":
        outcome = attack_in_namespace(FORK_BOMB, level)
        assert outcome["score"] == 0.0 and outcome["canary_alive"], outcome
        assert "os.fork is not allowed" in outcome["meta"]["reason"]
        return
    result = attack(FORK_BOMB, level)
    # namespaces: forks until RLIMIT_NPROC (EAGAIN); uid: the guard refuses fork at once
    assert_contained(result, limits={"processes", None})


def test_double_forked_sleeper_does_not_outlive_the_run(level: str) -> None:
    token = f"posttrain-sleeper-{os.getpid()}-{time.monotonic_ns()}"
    program = f"""
    import os, sys
    ready, tell = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.write(tell, b"1")
            os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(120)", "{token}"])
        os._exit(0)
    os.read(ready, 1)
    print("grandchild alive", file=sys.stderr, flush=True)
    def f(x):
        return -999
    """
    if level == "audit":
        outcome = attack_in_namespace(program, level)
        assert outcome["score"] == 0.0 and outcome["canary_alive"], outcome
        return
    result = attack(program, level)
    assert_contained(result, token)
    if level == "namespaces":  # forks are allowed there: the sleeper really started, then died
        assert "grandchild alive" in result.meta["stderr_tail"]


def test_files_outside_the_run_directory_survive(level: str, tmp_path: Path) -> None:
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    planted = tmp_path / "planted.txt"
    program = f"""
    import os, shutil
    done = []
    for action in (lambda: os.remove({str(sentinel)!r}), lambda: open({str(sentinel)!r}, "w").write("gone"),
                   lambda: open({str(planted)!r}, "w").write("hi"), lambda: shutil.rmtree({str(tmp_path)!r}),
                   lambda: os.rename({str(sentinel)!r}, {str(planted)!r})):
        try:
            action()
            done.append(1)
        except Exception:
            pass
    def f(x):
        return x + 1 if done else -999
    """
    result = attack(program, level)
    assert_contained(result)
    assert sentinel.read_text() == "keep me" and not planted.exists()


def test_host_files_and_environment_secrets_are_out_of_reach(level: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTTRAIN_FAKE_SECRET", SECRET)
    program = f"""
    import os
    seen = [os.environ.get("POSTTRAIN_FAKE_SECRET", "")]
    for path in ({str(REPO / 'pyproject.toml')!r}, {__file__!r}, "/etc/passwd", "/etc/hostname"):
        try:
            seen.append(open(path).read())
        except Exception:
            pass
    try:
        for pid in os.listdir("/proc"):
            try:
                seen.append(open(f"/proc/{{pid}}/environ", "rb").read().decode(errors="replace"))
            except Exception:
                pass
    except Exception:
        pass
    leaked = any({SECRET!r} in text or "[project]" in text or "root:" in text for text in seen)
    def f(x):
        return x + 1 if leaked else -999
    """
    result = attack(program, level)
    assert_contained(result)
    if level != "namespaces":
        assert result.meta["isolation"] == "weak"  # host files hidden only by the best-effort guard


ROOTLESS_SCRIPT = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("sandbox_by_path", sys.argv[1])
sandbox = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = sandbox
spec.loader.exec_module(sandbox)
reason = sandbox.probe_isolation("namespaces")
outcome = {"reason": reason}
if reason is None:
    limits = sandbox.SandboxLimits(isolation="namespaces", cpu_s=1, wall_s=10)
    programs = {
        "honest": "def f(x):\\n    return x + 1\\n",
        "kill": "import os\\nfor target in (0, -1):\\n    try:\\n        os.kill(target, 9)\\n    except OSError:\\n        pass\\n",
        "fork_bomb": "import os\\nwhile True:\\n    os.fork()\\n",
        "init_memory": "data = open('/proc/1/mem', 'rb').read(1)\\ndef f(x):\\n    return x + 1\\n",
    }
    for name, program in programs.items():
        result = sandbox.run_program(sandbox.SandboxRequest(program, tests=("assert f(1) == 2",)), limits)
        outcome[name] = {"passed": result.passed, "error": result.error, "limit": result.limit,
                         "features": result.features}
print(json.dumps(outcome))
"""


def test_rootless_user_namespace_level() -> None:
    """The namespaces level for a caller that is not root: a user namespace maps it to root
    inside, with no capabilities. Run here as nobody when this suite runs as root."""
    python = _world_executable_python()
    setpriv = shutil.which("setpriv")
    path = Path(sandbox.__file__).resolve()
    readable = all(os.stat(p).st_mode & 0o005 == 0o005 for p in [*path.parents][:-1]) and os.stat(path).st_mode & 0o004
    if os.geteuid() != 0 or not python or not setpriv or not readable:
        pytest.skip("needs root, setpriv, a world-executable Python and a world-readable checkout")
    command = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c", ROOTLESS_SCRIPT, str(path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    if outcome["reason"] is not None:
        pytest.skip(f"unprivileged user namespaces unavailable: {outcome['reason']}")
    assert outcome["honest"]["passed"] == [True] and "user" in outcome["honest"]["features"]
    assert outcome["kill"]["passed"] == [False] and outcome["kill"]["error"] is None  # the harness lived on
    assert outcome["fork_bomb"]["limit"] == "processes"
    assert outcome["init_memory"]["passed"] == [False] and outcome["init_memory"]["error"] is None


def test_uid_sweep_kills_leftovers_of_the_runs_uid() -> None:
    """The uid level's last line of defence (no PID namespace there): after a run, anything
    still running as the run's uid is killed."""
    if os.geteuid() != 0:
        pytest.skip("needs root to start a process as another uid")
    uid = sandbox._UID_BASE + 12345
    leftover = subprocess.Popen(["sleep", "60"], user=uid, group=uid)
    try:
        sandbox._sweep_uid(uid)
        assert leftover.wait(timeout=5) == -9
    finally:
        leftover.kill()


def test_the_init_process_memory_is_out_of_reach() -> None:
    """init is a fork of the harness (it holds the tests); the worker must not read it."""
    if sandbox.probe_isolation("namespaces") is not None:
        pytest.skip("namespaces level unavailable here")
    program = """
    import os
    read = []
    for name in ("mem", "environ", "maps"):
        try:
            with open(f"/proc/1/{name}", "rb") as handle:
                read.append(handle.read(64))
        except Exception:
            pass
    def f(x):
        return x + 1 if read else -999
    """
    assert_contained(attack(program, "namespaces"))


def test_sockets_reach_neither_loopback_nor_the_outside(level: str, listener) -> None:
    port, received = listener
    program = f"""
    import socket, sys
    reached = []
    for address in (("127.0.0.1", {port}), ("1.1.1.1", 53), ("151.101.0.223", 443)):
        try:
            connection = socket.create_connection(address, timeout=1)
            connection.sendall(b"pwned")
            reached.append(address)
        except Exception as error:
            print("blocked:", repr(error), file=sys.stderr)
    try:
        socket.getaddrinfo("pypi.org", 443)
        reached.append("dns")
    except Exception as error:
        print("blocked:", repr(error), file=sys.stderr)
    def f(x):
        return x + 1 if reached else -999
    """
    result = attack(program, level)
    assert_contained(result)
    time.sleep(0.2)
    assert received == []
    if level == "namespaces":
        assert "Network is unreachable" in result.meta["stderr_tail"]
    else:
        assert "socket" in result.meta["stderr_tail"] and "not allowed" in result.meta["stderr_tail"]


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_ten_gigabytes_of_output_hit_the_output_cap(level: str, stream: str) -> None:
    program = f"""
    import sys
    block = "x" * (1 << 20)
    for _ in range(10 * 1024):
        sys.{stream}.write(block)
    """
    started = time.monotonic()
    result = attack(program, level)
    assert_contained(result, limits={"output"})
    assert time.monotonic() - started < 10  # stopped at the cap, not after 10 GB


def test_a_run_killed_from_outside_returns_only_once_its_processes_are_gone(level: str) -> None:
    """The output cap kills the harness from the trainer's side; the worker then dies a moment
    later (parent-death signal, or its PID namespace torn down). A big address space makes that
    moment long: the run must still not return before it is over. Before the fix, about 4 runs
    in 10 at the audit level returned with the worker still alive."""
    program = """
    import sys
    ballast = bytearray(600 << 20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    block = "x" * (1 << 20)
    while True:
        sys.stdout.write(block)
    """
    for _ in range(5):
        assert_contained(attack(program, level, memory_mb=1024), limits={"output"})


def test_raising_its_own_rlimits_fails(level: str) -> None:
    program = """
    import resource
    raised = []
    for limit in (resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_NPROC, resource.RLIMIT_NOFILE):
        try:
            resource.setrlimit(limit, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            raised.append(limit)
        except Exception:
            pass
    def f(x):
        return x + 1 if raised else -999
    """
    assert_contained(attack(program, level))


KILL_EVERYTHING = """
import os, signal, sys
for name, target in (("parent", lambda: os.kill(os.getppid(), signal.SIGKILL)),
                     ("pid 1", lambda: os.kill(1, signal.SIGKILL)),
                     ("everything", lambda: os.kill(-1, signal.SIGKILL)),
                     ("own group", lambda: os.kill(0, signal.SIGKILL))):
    try:
        target()
    except Exception as error:
        print("refused:", name, repr(error), file=sys.stderr, flush=True)
def f(x):
    return -999
"""


def test_killing_the_parent_or_every_process_harms_nothing(level: str) -> None:
    if level == "audit":  # the worker is the caller's own uid: only the guard stands in the way
        outcome = attack_in_namespace(KILL_EVERYTHING, level)
        assert outcome["score"] == 0.0 and outcome["canary_alive"] and "error" not in outcome["meta"], outcome
        return
    canary = subprocess.Popen(["sleep", "60"])
    try:
        result = attack(KILL_EVERYTHING, level)
        assert_contained(result)
        assert canary.poll() is None  # the host's processes (and this test runner) live on
        assert "refused: parent" in result.meta["stderr_tail"]
    finally:
        canary.kill()
        canary.wait()


@pytest.mark.parametrize("exit_call", ["os._exit(0)", "sys.exit(0)", "os.kill(os.getpid(), 9)"])
def test_exiting_before_the_tests_run_scores_zero(level: str, exit_call: str) -> None:
    program = f"import os, sys\nprint('all tests passed')\n{exit_call}\n"
    result = attack(program, level)
    assert_contained(result)
    assert "does not load" in result.meta["reason"]


def test_exiting_inside_a_call_cannot_skip_an_exception_test(level: str) -> None:
    tests = ["try:\n    f(-1)\nexcept Exception:\n    pass\nelse:\n    raise AssertionError('f(-1) must raise')",
             "assert f(1) == 2"]
    program = "import os\ndef f(x):\n    os._exit(0)\n"
    result = attack(program, level, tests=tests)
    assert_contained(result)


def test_fake_verdicts_printed_or_written_count_for_nothing(level: str) -> None:
    program = """
    import os, sys, json
    fake = json.dumps({"event": "test", "index": 0, "passed": True})
    print("PASSED", fake, "3 passed in 0.01s")
    sys.stderr.write(fake + "\\n")
    for fd in range(1, 64):
        try:
            os.write(fd, (fake + "\\n").encode())
        except OSError:
            pass
    for name in ("results.json", "verdict.txt"):
        try:
            open(name, "w").write(fake)
        except OSError:
            pass
    def f(x):
        return -999
    """
    assert_contained(attack(program, level))


def test_objects_that_equal_everything_equal_nothing(level: str) -> None:
    program = """
    class AlwaysEqual:
        def __eq__(self, other): return True
        def __ne__(self, other): return False
        def __hash__(self): return 0
        def __bool__(self): return True
        def __index__(self): return 2
    class SneakyInt(int):
        def __eq__(self, other): return True
        __hash__ = int.__hash__
    class SneakyStr(str):
        def __eq__(self, other): return True
        __hash__ = str.__hash__
    class Liar:
        __class__ = property(lambda self: int)
        def __eq__(self, other): return True
    kinds = [AlwaysEqual(), SneakyInt(0), SneakyStr("no"), Liar()]
    calls = []
    def f(x):
        calls.append(x)
        return kinds[(len(calls) - 1) % len(kinds)]
    """
    tests = TESTS + ["assert f(7) == 8", "assert not (f(0) != 1)"]
    assert_contained(attack(program, level, tests=tests))


def test_monkeypatching_builtins_and_the_worker_changes_no_verdict(level: str) -> None:
    program = """
    import builtins, sys
    builtins.AssertionError = type("AssertionError", (Exception,), {})
    builtins.isinstance = lambda *args: True
    builtins.type = lambda *args: int
    main = sys.modules["__main__"]
    main._worker_dispatch = lambda request, state: {"ok": True, "value": True, "passed": True}
    main._encode_value = lambda value, fallback: True
    main._describe_exception = lambda exc: {"type": "Nothing", "builtin": "Exception", "message": ""}
    def f(x):
        return -999
    """
    assert_contained(attack(program, level))


def test_oversized_results_hit_the_result_limit(level: str) -> None:
    result = attack("def f(x):\n    return 'x' * (64 << 20)\n", level, memory_mb=512)
    assert_contained(result, limits={"result_size"})


def test_a_program_cannot_replace_the_prompts_helpers(shared_data: Path) -> None:
    """HumanEval/32 checks find_zero with the prompt's poly(); a program redefining poly to
    always return 0 must not make any root "correct"."""
    rows = [json.loads(line) for line in (shared_data / "humaneval" / "HumanEval.jsonl").open()]
    row = next(r for r in rows if r["task_id"] == "HumanEval/32")
    program = "def poly(xs, x):\n    return 0\n\ndef find_zero(xs):\n    return 12345.0\n"
    result = verify_code(program, row, limits=FAST)
    assert result.score == 0.0, result.meta
    assert verify_code(row["canonical_solution"], row, limits=FAST).score == 1.0


# -- real data: reference solutions pass, mutants fail ------------------------------------------

_FLIPPED = {"Lt": "GtE", "GtE": "Lt", "Gt": "LtE", "LtE": "Gt", "Eq": "NotEq", "NotEq": "Eq",
            "In": "NotIn", "NotIn": "In", "Is": "IsNot", "IsNot": "Is"}
# Comparison flips that the datasets' own tests cannot tell apart from the reference:
# equivalent mutants or untested inputs, not verifier errors.
FLIP_SURVIVORS = {
    "HumanEval/127",  # `num == 2` -> `!=` calls every n >= 2 prime; no test has a composite length
    "MBPP/3",  # is_not_prime: `n % i != 0` still right on the three tested n
    "MBPP/76", "MBPP/347",  # count_Squares: the operand swap only matters for inputs not tested
    "MBPP/101",  # kth_element: the flipped bubble pass gives the same k-th item on the tests
    "MBPP/227",  # min_of_three: the later branches catch what the first one misses
    "MBPP/658",  # max_occurrences: ties broken the other way, never tested
    "MBPP/661",  # max_sum_of_three_consecutive: an `n >= 1` guard the loop makes redundant
    "MBPP/876",  # lcm: starts counting from the smaller number, same answer
    "MBPP/952",  # nCr_mod_p: the `r = n - r` shortcut is a symmetry, C(n, r) = C(n, n - r)
}


def flip_first_comparison(program: str, name: str) -> str | None:
    """The program with the first comparison (breadth first) inside function ``name`` flipped."""
    import ast

    tree = ast.parse(program)
    functions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == name]
    for node in ast.walk(functions[-1]) if functions else ():
        if isinstance(node, ast.Compare):
            node.ops[0] = getattr(ast, _FLIPPED[type(node.ops[0]).__name__])()
            return ast.unparse(tree)
    return None


def check_dataset(rows: list[dict], references: list[str], nones: list[str], whole: list[str], prefix: str,
                  name_of) -> None:
    """References pass; `return None` mutants fail; comparison flips of ``whole`` (the reference
    as complete functions) fail except the known survivors."""
    flips = [(row, flip_first_comparison(program, name_of(row))) for row, program in zip(rows, whole)]
    flips = [(row, program) for row, program in flips if program is not None]
    programs = references + nones + [program for _, program in flips]
    every_row = rows + rows + [row for row, _ in flips]
    results = verify_code_batch(programs, every_row, all_or_nothing=True)
    n = len(rows)
    failed = [f"{prefix}{row['task_id']}: {r.meta.get('reason') or r.meta.get('error')}"
              for row, r in zip(rows, results[:n]) if r.score != 1.0]
    assert failed == [], failed
    assert all(r.meta["isolation"] for r in results)
    passing_nones = [row["task_id"] for row, r in zip(rows, results[n:2 * n]) if r.score != 0.0]
    assert passing_nones == []
    passing_flips = {f"{prefix}{row['task_id']}" for (row, _), r in zip(flips, results[2 * n:]) if r.score != 0.0}
    assert passing_flips <= FLIP_SURVIVORS, passing_flips - FLIP_SURVIVORS
    assert len(flips) > n / 3  # the flip mutants are a real sample


def test_humaneval_canonical_solutions_pass_and_mutants_fail(shared_data: Path) -> None:
    rows = [json.loads(line) for line in (shared_data / "humaneval" / "HumanEval.jsonl").open()]
    assert len(rows) == 164
    references = [row["canonical_solution"] for row in rows]
    nones = ["    return None\n"] * len(rows)  # the body replaced, continuing the prompt
    full = [row["prompt"] + row["canonical_solution"] for row in rows]
    check_dataset(rows, references, nones, full, "", lambda row: row["entry_point"])
    results = verify_code_batch(full[:20], rows[:20], all_or_nothing=True)  # full-function completions
    assert [r.score for r in results] == [1.0] * 20


@pytest.mark.slow
def test_mbpp_reference_solutions_pass_and_mutants_fail(shared_data: Path) -> None:
    rows = [json.loads(line) for line in (shared_data / "mbpp" / "mbpp.jsonl").open()]
    assert len(rows) == 974
    references = [row["code"].replace("\r\n", "\n") for row in rows]
    names = {row["task_id"]: infer_entry_point(row["test_list"]) for row in rows}
    nones = [f"{code}\n\ndef {names[row['task_id']]}(*args, **kwargs):\n    return None\n"
             for row, code in zip(rows, references)]
    check_dataset(rows, references, nones, references, "MBPP/", lambda row: names[row["task_id"]])
