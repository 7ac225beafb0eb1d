"""Start train.py and test.py as real processes without paying their imports each time (tests only).

Importing Lightning (with torch, torchvision, torchmetrics and SciPy behind it) takes 5–15 s of CPU on the 2-core
machines this suite runs on, several times what a small test run itself takes. This server is started once per
pytest worker as `python -m tests.forkserver`, imports `cnn_exp.run` (and so all of that), and then, for each
request, forks a child that runs the entry script as `python script args...` would: its own process and pid, the
request's working directory, environment and arguments, stdin from /dev/null, stdout and stderr to files, the
script run as `__main__`, Python's exit status (SystemExit's code; 1 and a traceback for an uncaught exception;
death by the signal for SIGINT's KeyboardInterrupt), atexit handlers run. Signals sent to it are real.

What a fork cannot give, tests get from a plain subprocess (`run(..., cold=True)` in conftest.py): torch's thread
count decided by the environment at import (the server is started with one thread, as the suite's runs use), and
the imports themselves.

Protocol, one JSON object per line: the request {"script", "args", "cwd", "env", "stdout", "stderr"} on stdin;
the replies {"pid": N} when the child started and {"returncode": N} when it ended, on stdout.
"""

import atexit
import contextlib
import io
import json
import os
import runpy
import signal
import sys
import traceback


def _child(request: dict) -> None:
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
        sys.argv = [request["script"], *request["args"]]
        sys.path[0] = os.path.dirname(os.path.abspath(request["script"]))
        code = 0
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
    """What the interpreter does on its way out: the atexit handlers, then the standard streams."""
    try:
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()


def _reply(message: dict) -> None:
    sys.__stdout__.write(json.dumps(message) + "\n")
    sys.__stdout__.flush()


def main() -> None:
    import cnn_exp.run  # noqa: F401  (the imports every child would otherwise repeat)

    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        _reply({"pid": pid})
        _, status = os.waitpid(pid, 0)
        _reply({"returncode": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    main()
