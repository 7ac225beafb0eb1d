"""Start train.py and test.py as real processes without paying their imports each time (tests only).

Importing Lightning (with torch, torchvision, torchmetrics and SciPy behind it) takes 5–15 s of CPU on the 2-core
machines this suite runs on, several times what a small test run itself takes. The server (`main`) is started once
per pytest worker as `python -m tests.forkserver`, imports `cnn_exp.run` (and so all of that) and nothing runs in
it; for each request it forks a child that becomes `python script args...` (or `python -c code args...`): its
own process and pid, the request's working directory, environment and arguments, torch's thread count from that
environment (as torch sets it at import), stdin from /dev/null, stdout and stderr to files, the script run as
`__main__`, Python's exit status (SystemExit's code; 1 and a traceback for an uncaught exception; death by SIGINT
for an uncaught KeyboardInterrupt), atexit handlers run. Signals sent to it are real, and several may run at once.

`Server` and `Process` are the pytest side: a Popen-like handle on each child. A plain `python script ...` start
(tests/conftest.py's `run(..., cold=True)`) remains for what a fork cannot show: the imports themselves.

Protocol, one JSON object per line: requests {"id", "script" or "code", "args", "cwd", "env", "stdout", "stderr"}
on the server's stdin; replies {"id", "pid"} when a child started and {"pid", "returncode"} when it ended.
"""

import atexit
import contextlib
import io
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path


def _child(request: dict, threads: int) -> None:
    """Become `python script args...` and never return."""
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        stdin = os.open(os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        # PYTHONUNBUFFERED's streams: what is printed reaches the file at once, as it reaches a pipe.
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", write_through=True)
        sys.stderr = io.TextIOWrapper(
            io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace", write_through=True
        )
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or threads))
        code = 0
        if "code" in request:
            sys.argv = ["-c", *request["args"]]
            sys.path[0] = ""
            exec(compile(request["code"], "<string>", "exec"), {"__name__": "__main__"})
        else:
            sys.argv = [request["script"], *request["args"]]
            sys.path[0] = os.path.dirname(os.path.abspath(request["script"]))
            runpy.run_path(request["script"], run_name="__main__")
    except SystemExit as stop:
        if stop.code is None:
            code = 0
        elif isinstance(stop.code, int):
            code = stop.code
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        _flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)  # as Python ends on an uncaught KeyboardInterrupt
    except BaseException:
        traceback.print_exc()
        code = 1
    _flush()
    os._exit(code)


def _flush() -> None:
    """What the interpreter does on its way out: join the threads (and run what was registered for then, such as
    an executor's shutdown), the atexit handlers, then flush the standard streams."""
    for step in (threading._shutdown, atexit._run_exitfuncs):
        try:
            step()
        except BaseException:
            traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()


def main() -> None:
    import torch

    import cnn_exp.run  # noqa: F401  (the imports every child would otherwise repeat)

    threads = torch.get_num_threads()  # what torch chose here; a child's OMP_NUM_THREADS overrides it
    running: set[int] = set()
    pending = b""

    def reply(message: dict) -> None:
        os.write(1, (json.dumps(message) + "\n").encode())

    while True:
        while running and (ended := os.waitpid(-1, os.WNOHANG))[0]:
            running.discard(ended[0])
            reply({"pid": ended[0], "returncode": os.waitstatus_to_exitcode(ended[1])})
        if not select.select([0], [], [], 0.05 if running else None)[0]:
            continue
        if not (chunk := os.read(0, 1 << 16)):
            return  # pytest is done
        pending += chunk
        while b"\n" in pending:
            line, _, pending = pending.partition(b"\n")
            request = json.loads(line)
            if (pid := os.fork()) == 0:
                _child(request, threads)
            running.add(pid)
            reply({"id": request["id"], "pid": pid})


class Process:
    """A child of the server, used like subprocess.Popen: pid, poll, wait, send_signal, kill; `result()` once it
    ended gives a CompletedProcess with its output."""

    def __init__(self, server: "Server", pid: int, args: list[str], folder: tempfile.TemporaryDirectory) -> None:
        self.server, self.pid, self.args, self.folder = server, pid, args, folder
        self.returncode: int | None = None

    @property
    def stdout_path(self) -> Path:
        return Path(self.folder.name) / "stdout"

    @property
    def stderr_path(self) -> Path:
        return Path(self.folder.name) / "stderr"

    def poll(self) -> int | None:
        if self.returncode is None:
            self.server.collect(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.server.collect(left)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def result(self) -> subprocess.CompletedProcess:
        out, err = (p.read_text(errors="replace") for p in (self.stdout_path, self.stderr_path))
        self.folder.cleanup()
        return subprocess.CompletedProcess(self.args, self.wait(), out, err)


class Server:
    """This pytest worker's server, started when first needed."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.proc: subprocess.Popen | None = None
        self.pending = b""
        self.started: dict[int, int] = {}  # request id -> pid
        self.children: dict[int, Process] = {}
        self.requests = 0

    def start(self, args: list[str], env: dict[str, str], code: str | None = None) -> Process:
        """`python *args` (`python -c code *args` with `code`) in the project root, with `env`."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.forkserver"], cwd=self.root, env=self.env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
            )  # fmt: skip
            atexit.register(self.proc.kill)
        self.requests += 1
        folder = tempfile.TemporaryDirectory(prefix="forked-")
        for name in ("stdout", "stderr"):  # there to read from the start, as a pipe is
            Path(folder.name, name).touch()
        request = {"id": self.requests, "args": args if code is not None else args[1:], "cwd": str(self.root)}
        request |= {"code": code} if code is not None else {"script": args[0]}
        request |= {"env": env, "stdout": f"{folder.name}/stdout", "stderr": f"{folder.name}/stderr"}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        while self.requests not in self.started:
            self.collect(60)
        pid = self.started.pop(self.requests)
        self.children[pid] = Process(self, pid, ["python", *(["-c", code] if code is not None else []), *args], folder)
        return self.children[pid]

    def collect(self, timeout: float | None) -> None:
        """Read the server's replies that arrive within `timeout` seconds (at least one, if any arrives)."""
        if b"\n" not in self.pending:
            if not select.select([self.proc.stdout], [], [], timeout)[0]:
                return
            if not (chunk := os.read(self.proc.stdout.fileno(), 1 << 16)):
                raise RuntimeError(f"tests/forkserver.py ended (exit status {self.proc.wait()})")
            self.pending += chunk
        while b"\n" in self.pending:
            line, _, self.pending = self.pending.partition(b"\n")
            message = json.loads(line)
            if "id" in message:
                self.started[message["id"]] = message["pid"]
            elif (child := self.children.pop(message["pid"], None)) is not None:
                child.returncode = message["returncode"]


if __name__ == "__main__":
    main()
