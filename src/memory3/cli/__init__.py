"""The `memory3` command line. Results go to stdout, progress and logs to stderr; an error is one
line on stderr (`-v` adds the traceback) with exit code 2 for bad input and 1 for a failure.

One module per group of commands, each with a `register(subparsers)`: generate.py (demo,
convert, export, generate), bank.py (build, store), eval.py (eval, bench all; bench.py: bench speed and
storage, measure.py: what they share), train.py (train), serve.py (serve); demo.py runs the
demo; common.py holds the arguments every command shares. Heavy imports happen inside the
commands, so `memory3 --help` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import os
import sys
import traceback

from memory3.cli import bank, generate, serve, train
from memory3.cli import eval as evaluate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memory3", description="Language modeling with explicit memory (Memory³)"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    for register in (generate.register, bank.register, evaluate.register, train.register, serve.register):
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest  # what `memory3 lm-eval` hands to lm-eval
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:  # faiss says at INFO which of its builds it loads, failed tries included
        logging.getLogger("faiss").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if argv is None:  # a real process (the console script, torchrun), not a call from Python
        _print_python_stack_on_native_crash()
    try:
        code = int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # the reader of stdout left (`| head`): stop quietly, as a shell tool does
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141
    except Exception as e:
        code = error_exit_code(e)
        if code is None:
            raise
        if args.verbose:
            traceback.print_exc()
        print(f"error: {error_line(e)}", file=sys.stderr)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and argv is None:
        _leave_torchrun_worker(code)
    return code


def error_exit_code(e: BaseException) -> int | None:
    """The exit code for an error the command line reports in one line (None: a bug, which
    keeps its traceback). memory3's own errors carry theirs; bad input (ValueError) is 2;
    files the system refused (missing, permissions, a damaged database) are 1."""
    import sqlite3

    from memory3.errors import Memory3Error

    if isinstance(e, Memory3Error):
        return e.exit_code
    if isinstance(
        e, ValueError | FileNotFoundError | NotADirectoryError | IsADirectoryError | FileExistsError
    ):
        return 2
    if isinstance(e, OSError | sqlite3.DatabaseError):
        return 1
    return None


def error_line(e: BaseException) -> str:
    """One line: the error's own message (with the file an OSError names), without line breaks."""
    if isinstance(e, OSError) and e.filename and str(e.filename) not in str(e):
        msg = f"{e.filename}: {e.strerror or e}"
    else:
        msg = str(e) or type(e).__name__
    return " ".join(msg.split())


def _print_python_stack_on_native_crash() -> None:
    """A crash in native code (SIGSEGV, SIGABRT) prints the Python stack of every thread. Skipped
    when stderr is not a real file (captured by a test runner or a notebook): faulthandler writes
    to a file descriptor."""
    with contextlib.suppress(AttributeError, OSError, ValueError):  # io.UnsupportedOperation
        faulthandler.enable(file=sys.stderr)


def _leave_torchrun_worker(code: int) -> None:
    """End a torchrun worker without the interpreter's teardown. The commands have left the process
    group (barrier, then destroy_process_group) and closed every file by now, yet gloo's threads
    can still abort the process while it is torn down ("terminate called without an active
    exception", PyTorch issue #190489), which turns a finished run into a failed one for torchrun."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
