"""The function-call judge: the source that runs inside the sandbox for HumanEval-style tests.

Two processes, so that the verdict never depends on anything the program under test can reach:

- the *judge* reads its job from stdin (the solution, the entry point, the trusted test code and
  a one-time nonce), makes itself non-dumpable (a process of the same uid can then neither read
  its memory nor open its /proc files nor ptrace it), starts the *candidate* and runs the test
  code's `check(candidate)` with a proxy in place of the entry point;
- the *candidate* is a fresh interpreter (exec'd, so its memory never held the test code or the
  nonce) that runs the solution and answers calls: the proxy sends the arguments, the candidate
  calls the entry point and sends back the return value as plain data.

Values cross in a tagged JSON form that only knows plain types (exact int, bool, float, complex,
str, bytes, None, list, tuple, dict, set, frozenset): the judge builds fresh objects of those
types, so an object with a custom `__eq__`, a subclass of int/str/list or a generator never
reaches the comparison; the candidate reports it as not plain data and the case fails. The judge
prints its verdict as one line starting with the nonce; the candidate's output goes to a log.

Everything here is standard library only: the file's text is the program the sandbox runs
(`judge_program()`), and the judge passes the same text to the candidate.
"""

from __future__ import annotations

import functools
import json
import os
import sys

MAX_DEPTH = 64  # nesting of a value
MAX_REPLY_BYTES = 8 * 1024 * 1024  # one encoded return value
MAX_MESSAGE_CHARS = 500
CANDIDATE_LOG = "candidate.log"
CANDIDATE_EXIT_GRACE_S = 1.0
PR_SET_DUMPABLE, PR_GET_DUMPABLE = 4, 3


class NotPlainData(TypeError):
    """A value of a type that may not cross the process boundary."""


class Malformed(ValueError):
    """An encoded value that does not follow the format."""


# ---------------------------------------------------------------------------------------------
# Plain data <-> tagged JSON (both processes)


def encode(value: object, depth: int = 0) -> list:
    """A plain value -> its tagged JSON form; NotPlainData names the first other type met
    (exact types only: a subclass of int or list is not plain data)."""
    if depth > MAX_DEPTH:
        raise NotPlainData(f"nested deeper than {MAX_DEPTH} levels")
    kind = type(value)
    if value is None:
        return ["n"]
    if kind is bool:
        return ["b", value]
    if kind is int:
        return ["i", hex(value)]
    if kind is float:
        return ["f", value.hex()]
    if kind is complex:
        return ["c", value.real.hex(), value.imag.hex()]
    if kind is str:
        return ["s", value]
    if kind is bytes:
        return ["y", value.hex()]
    if kind in (list, tuple, set, frozenset):
        tag = {list: "l", tuple: "t", set: "S", frozenset: "F"}[kind]
        return [tag, [encode(item, depth + 1) for item in value]]
    if kind is dict:
        return ["d", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]]
    raise NotPlainData(f"a value of type {kind.__module__}.{kind.__qualname__}")


def decode(form: object, depth: int = 0) -> object:
    """Tagged JSON -> fresh plain objects; Malformed for anything else."""
    if depth > MAX_DEPTH or type(form) is not list or not form or type(form[0]) is not str:
        raise Malformed("not a tagged value")
    tag, args = form[0], form[1:]
    try:
        if tag == "n" and not args:
            return None
        if tag == "b" and len(args) == 1 and type(args[0]) is bool:
            return args[0]
        if tag in ("i", "f", "y") and len(args) == 1 and type(args[0]) is str:
            parse = {"i": lambda t: int(t, 16), "f": float.fromhex, "y": bytes.fromhex}[tag]
            return parse(args[0])
        if tag == "c" and len(args) == 2 and all(type(a) is str for a in args):
            return complex(float.fromhex(args[0]), float.fromhex(args[1]))
        if tag == "s" and len(args) == 1 and type(args[0]) is str:
            return args[0]
        if tag in ("l", "t", "S", "F") and len(args) == 1 and type(args[0]) is list:
            items = [decode(item, depth + 1) for item in args[0]]
            return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)
        if tag == "d" and len(args) == 1 and type(args[0]) is list:
            pairs = args[0]
            if not all(type(p) is list and len(p) == 2 for p in pairs):
                raise Malformed("a dict entry is not a pair")
            return {decode(k, depth + 1): decode(v, depth + 1) for k, v in pairs}
    except (TypeError, ValueError, OverflowError, RecursionError) as e:
        raise Malformed(f"bad {tag!r} value: {e}") from None
    raise Malformed(f"unknown tag {tag!r} or wrong arity")


def _line(message: list) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


# ---------------------------------------------------------------------------------------------
# The candidate: runs the solution, answers calls


def candidate_main() -> None:
    """fd 0: calls from the judge; fd 1: replies; fd 2: the log. Exits at EOF."""
    calls = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # the solution's prints go to the log, never into a reply
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115

    def reply(message: list) -> None:
        try:
            sys.stdout.flush()
        except BaseException:
            pass
        replies.write(_line(message))
        replies.flush()

    def guarded(stage: str, when: str, run, /, *args, **kwargs) -> tuple[bool, bool, object]:
        """Run the program's code: (done, ok, value). An exit or exception is replied here:
        an exit ends the candidate (done), an exception only this step (not ok)."""
        try:
            return False, True, run(*args, **kwargs)
        except SystemExit as e:
            reply(["exit", f"the program called exit({e.code!r}) {when}"])
            return True, False, None
        except BaseException as e:
            import traceback

            traceback.print_exc()
            reply(["raise", type(e).__name__, _short(e), stage])
            return stage == "loading", False, None

    job = json.loads(calls.readline())
    namespace = {"__name__": "__solution__"}
    done, ok, _ = guarded("loading", "while loading", _load, job["solution"], namespace)
    if done or not ok:
        return
    function = namespace.get(job["entry_point"])
    if not callable(function):
        reply(["missing", job["entry_point"]])
        return
    reply(["ready"])
    for line in calls:
        request = json.loads(line)
        args, kwargs = decode(request[0]), decode(request[1])
        done, ok, result = guarded("call", "during a call", function, *args, **kwargs)
        if done:
            return
        if not ok:
            continue
        try:
            reply(["ok", encode(result)])
        except NotPlainData as e:
            reply(["nonplain", str(e)])
        except RecursionError:
            reply(["nonplain", "a value nested too deeply"])


def _load(solution: str, namespace: dict) -> None:
    exec(compile(solution, "solution.py", "exec"), namespace)


def _short(error: BaseException) -> str:
    try:
        text = str(error)
    except BaseException:
        text = "<unprintable>"
    return text[:MAX_MESSAGE_CHARS]


# ---------------------------------------------------------------------------------------------
# The judge: runs the test code against the candidate through a proxy


class Verdict(Exception):
    """Ends the judging with a verdict decided by the judge (not by an assertion)."""

    def __init__(self, verdict: str, message: str) -> None:
        super().__init__(message)
        self.verdict, self.message = verdict, message


class Candidate:
    """Stands in for the entry point in `check(candidate)`: each call is a round trip."""

    def __init__(self, pid: int, calls, replies) -> None:
        self.pid, self.calls, self.replies = pid, calls, replies
        self.n_calls = 0

    def receive(self) -> list:
        line = self.replies.readline(MAX_REPLY_BYTES + 1)
        if not line.endswith(b"\n"):
            if len(line) > MAX_REPLY_BYTES:
                raise Verdict("WA", f"a return value is larger than {MAX_REPLY_BYTES} bytes")
            raise Verdict(*self.gone())
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            raise Verdict("WA", "a reply that is not plain data (malformed)") from None
        if type(message) is not list or not message or type(message[0]) is not str:
            raise Verdict("WA", "a reply that is not plain data (malformed)")
        return message

    def gone(self) -> tuple[str, str]:
        """The candidate stopped answering: why, from its exit status."""
        status = _wait(self.pid, CANDIDATE_EXIT_GRACE_S)
        if status is None:
            return "RE", "the program closed its reply channel"
        if os.WIFSIGNALED(status):
            signal_number = os.WTERMSIG(status)
            if signal_number == 24:  # SIGXCPU
                return "TLE", "the program ran out of CPU time"
            return "RE", f"the program was killed by signal {signal_number}"
        return "RE", f"the program exited (status {os.waitstatus_to_exitcode(status)})"

    def __call__(self, *args: object, **kwargs: object) -> object:
        try:
            request = [encode(list(args)), encode(kwargs)]
        except NotPlainData as e:
            raise Verdict(
                "RE", f"the test passes {e} to the entry point: only plain data crosses"
            ) from None
        self.n_calls += 1
        try:
            self.calls.write(_line(request))
            self.calls.flush()
        except OSError:
            raise Verdict(*self.gone()) from None
        message = self.receive()
        kind = message[0]
        if kind == "ok" and len(message) == 2:
            try:
                return decode(message[1])
            except Malformed as e:
                raise Verdict("WA", f"a reply that is not plain data ({e})") from None
        if kind == "raise" and len(message) == 4:
            raise _candidate_exception(str(message[1]), str(message[2]))
        if kind == "nonplain" and len(message) == 2:
            raise Verdict(
                "WA",
                f"call {self.n_calls} returned {str(message[1])[:MAX_MESSAGE_CHARS]}: "
                "only plain data (numbers, strings, bytes, bool, None, lists, tuples, dicts, "
                "sets) is compared",
            )
        if kind == "exit" and len(message) == 2:
            raise Verdict("RE", str(message[1])[:MAX_MESSAGE_CHARS])
        raise Verdict("WA", "a reply that is not plain data (malformed)")


def _candidate_exception(name: str, text: str) -> Exception:
    """The candidate's exception, rebuilt in the judge: a builtin exception class by name (so
    a test that expects ValueError sees one), else RuntimeError naming the type."""
    import builtins

    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception) and cls.__module__ == "builtins":
        try:
            return cls(text)
        except Exception:
            pass
    return RuntimeError(f"{name}: {text}")


def _wait(pid: int, timeout_s: float) -> int | None:
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            return None
        time.sleep(0.005)


def _non_dumpable() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    if libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError("could not make the judge non-dumpable")


def _start_candidate(source: str) -> tuple[int, object, object, int]:
    """The candidate as a fresh interpreter: its stdin/stdout are the call and reply pipes, its
    stderr the log file (the judge's own stdout is never shared)."""
    calls_r, calls_w = os.pipe()
    replies_r, replies_w = os.pipe()
    log = _open_log()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    env["HOME"] = os.environ.get("HOME", os.getcwd())
    pid = os.posix_spawn(
        sys.executable,
        [sys.executable, "-I", "-c", source + "\ncandidate_main()\n"],
        env,
        file_actions=[
            (os.POSIX_SPAWN_DUP2, calls_r, 0),
            (os.POSIX_SPAWN_DUP2, replies_w, 1),
            (os.POSIX_SPAWN_DUP2, log, 2),
        ],
    )
    for fd in (calls_r, replies_w):
        os.close(fd)
    return pid, os.fdopen(calls_w, "wb"), os.fdopen(replies_r, "rb"), log


def _open_log() -> int:
    """A fresh log file (never one the program left behind: no link, no FIFO)."""
    try:
        os.unlink(CANDIDATE_LOG)
    except FileNotFoundError:
        pass
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    return os.open(CANDIDATE_LOG, flags, 0o600)


def _trusted_imports_only() -> None:
    """Import only from places the program cannot write: drop the script's directory and every
    writable entry from sys.path (the program shares this uid and work dir, and could plant a
    `traceback.py` there), then import what the judge itself uses later. The sandbox starts the
    judge with `python -I` (no user site-packages, no PYTHON* variables)."""
    cwd = os.path.realpath(os.getcwd())
    root = os.geteuid() == 0  # unisolated as root: everything is writable, nothing to gain

    def trusted(path: str) -> bool:
        return bool(path) and os.path.realpath(path) != cwd and (root or not os.access(path, 2))

    sys.path[:] = [p for p in sys.path if trusted(p)]
    sys.path_importer_cache.clear()
    import builtins  # noqa: F401
    import ctypes  # noqa: F401
    import time  # noqa: F401
    import traceback  # noqa: F401


def judge_main(source: str) -> None:
    """Judge one case; prints `<nonce> <json verdict>` as the last line."""
    _trusted_imports_only()
    job = json.loads(sys.stdin.buffer.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # the job's file (where stdin is one) stays open nowhere
    os.close(devnull)
    nonce = job["nonce"]
    result = {"verdict": "RE", "message": ""}
    pid = log = None
    try:
        _non_dumpable()
        pid, calls, replies, log = _start_candidate(source)
        candidate = Candidate(pid, calls, replies)
        calls.write(_line({"solution": job["solution"], "entry_point": job["entry_point"]}))
        calls.flush()
        result = _judge(job, candidate)
    except Verdict as v:
        result = {"verdict": v.verdict, "message": v.message}
    except OSError as e:
        result = {"verdict": "ERROR", "message": f"judge set-up failed: {e}"}
    finally:
        if pid is not None:
            try:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    result["log"] = _tail(log) if log is not None else ""
    sys.stdout.flush()
    os.write(1, f"\n{nonce} {json.dumps(result)}\n".encode())
    os._exit(0)


def _judge(job: dict, candidate: Candidate) -> dict:
    first = candidate.receive()
    if first[0] == "missing":
        return {"verdict": "RE", "message": f"entry point {job['entry_point']} is not defined"}
    if first[0] == "raise":
        return {"verdict": "RE", "message": f"loading the program raised {first[1]}: {first[2]}"}
    if first[0] == "exit":
        return {"verdict": "RE", "message": str(first[1])}
    if first != ["ready"]:
        return {"verdict": "WA", "message": "a reply that is not plain data (malformed)"}
    namespace = {"__name__": "__check__"}
    try:
        exec(compile(job.get("setup") or "", "setup.py", "exec"), namespace)
        exec(compile(job["check"], "check.py", "exec"), namespace)
        check = namespace.get("check")
        if not callable(check):
            return {"verdict": "ERROR", "message": "the test code defines no check()"}
        namespace[job["entry_point"]] = candidate  # test code may call it by name, too
        check(candidate)
    except Verdict:
        raise
    except AssertionError:
        return {"verdict": "WA", "message": f"assertion failed{_where()}"}
    except MemoryError:
        return {"verdict": "MLE", "message": "memory limit exceeded"}
    except BaseException as e:
        return {"verdict": "RE", "message": f"{type(e).__name__}: {_short(e)}{_where()}"}
    if candidate.n_calls == 0:
        return {"verdict": "ERROR", "message": "the test code never called the entry point"}
    return {"verdict": "AC", "message": ""}


def _where() -> str:
    """` (check.py line N)` for the innermost frame of the test code in the exception."""
    import traceback

    frames = [f for f in traceback.extract_tb(sys.exc_info()[2]) if f.filename == "check.py"]
    return f" (check.py line {frames[-1].lineno})" if frames else ""


def _tail(fd: int, limit: int = 2000) -> str:
    try:
        size = os.fstat(fd).st_size
        return os.pread(fd, limit, max(0, size - limit)).decode("utf-8", errors="replace")
    except OSError:
        return ""


@functools.cache
def judge_program() -> str:
    """The program text a sandbox runs as the judge (stdin: the job as JSON): this file, then
    a call of judge_main with this file's text (which the candidate runs as well)."""
    with open(__file__, encoding="utf-8") as f:
        source = f.read()
    return f"{source}\n\njudge_main({source!r})\n"
