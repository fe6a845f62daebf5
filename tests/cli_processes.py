"""``python -m sdpo ARGS`` as a new process, without importing torch anew for every run.

The fault, tracking and out-of-memory tests start the real CLI dozens of times; each fresh
interpreter spent about 3 s of CPU importing torch, datasets and Dynamo before the run began.
Here a server process imports them once; each run is a child forked from it that takes the
caller's environment, working folder and argv, sends stdout and stderr to files, and runs the
``sdpo`` package as ``__main__`` (its ``__main__.py``, as ``python -m sdpo`` does). The child is
a real process: it dies by the real signal, exits with the CLI's code, runs its ``atexit``
handlers and joins its threads on the way out as any interpreter does, and its exit status is
reported as ``subprocess`` reports it (``-9`` for SIGKILL).

Each server is single-threaded and runs one child at a time (a concurrent caller gets another
server). Every server starts with its own ``PYTHONHASHSEED`` and a caller's consecutive runs go
to servers of different seeds, so a run resumed after a kill hashes strings differently from the
run that was killed, as two fresh interpreters would.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from itertools import count
from pathlib import Path

# what ``sdpo train`` imports on the way, loaded once per server
PRELOAD = ("torch", "sdpo.cli", "sdpo.runner", "datasets", "torch._dynamo")

_SERVER = r"""
import importlib, json, os, runpy, sys

for name in sys.argv[1:]:
    importlib.import_module(name)
requests, replies = sys.stdin.buffer, sys.stdout.buffer


def serve():
    replies.write(b"ready\n")
    replies.flush()
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            return request
        replies.write(b"%d\n" % pid)
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(b"%d\n" % status)
        replies.flush()
    return None


request = serve()
if request is None:  # the caller closed the pipe: nothing of this process needs cleaning up
    os._exit(0)
else:  # the child: become `python -m sdpo ARGS` of the caller
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path, flags in (
        (0, os.devnull, os.O_RDONLY),
        (1, request["stdout"], os.O_WRONLY | os.O_TRUNC),
        (2, request["stderr"], os.O_WRONLY | os.O_TRUNC),
    ):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    sys.argv = ["sdpo", *request["args"]]
    runpy.run_module("sdpo", run_name="__main__", alter_sys=True)
"""


class _Server:
    def __init__(self, seed: int):
        env = {**os.environ, "PYTHONHASHSEED": str(seed), "OMP_NUM_THREADS": "1"}
        env.pop("SDPO_FAULT_AT", None)
        self.seed = seed
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, *PRELOAD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._pending = b""
        ready = self._line(timeout=300)
        assert ready == b"ready", f"the CLI server did not start: {ready!r}"

    def _line(self, timeout: float | None) -> bytes | None:
        """The next reply line, or None when ``timeout`` seconds pass first."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._pending:
            if not select.select([fd], [], [], timeout)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"the CLI server ended (code {self.proc.wait()})")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return line

    def run(self, args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="sdpo-cli-") as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            out.touch()
            err.touch()
            request = {"args": args, "env": env, "cwd": os.getcwd()}
            request.update(stdout=str(out), stderr=str(err))
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
            pid = int(self._line(timeout=60))
            status = self._line(timeout=timeout)
            if status is None:  # a hang: end the run as subprocess.run(timeout=) would
                os.kill(pid, signal.SIGKILL)
                self._line(timeout=60)
                raise subprocess.TimeoutExpired(["sdpo", *args], timeout, err.read_text())
            code = os.waitstatus_to_exitcode(int(status))
            return subprocess.CompletedProcess(
                ["sdpo", *args], code, out.read_text(), err.read_text()
            )

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


_lock = threading.Lock()
_idle: list[_Server] = []
_seeds = count(1)
_last_seed = threading.local()


@atexit.register
def _close_all() -> None:
    with _lock:
        while _idle:
            _idle.pop().close()


def run_sdpo(
    args: list[str], *, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, "-m", "sdpo", *args], env=env, capture_output=True,
    text=True, timeout=timeout)``, in a child forked from a server (module docstring). The
    child's ``OMP_NUM_THREADS`` is 1 whatever ``env`` says: torch read it in the server."""
    last = getattr(_last_seed, "seed", None)
    with _lock:
        server = next((s for s in _idle if s.seed != last), None)
        if server is not None:
            _idle.remove(server)
    if server is None:
        server = _Server(next(_seeds))
    try:
        return server.run(list(args), dict(env), timeout)
    finally:
        _last_seed.seed = server.seed
        if server.proc.poll() is None:  # a server that ended is not used again
            with _lock:
                _idle.append(server)
