"""How both commands (`paligemma`, `paligemma-convert`) meet the user: one line per error.

Library code raises; this turns every exception into `error: <message>` on stderr and an exit
code, never a traceback (`--debug` shows it), and turns SIGTERM into the same clean-up and
message as Ctrl-C. Exit codes: 0 ok, 1 failed (e.g. a parity stage out of tolerance, set by the
command), 2 bad input, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM), 3 internal error.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

from . import outputs

logger = logging.getLogger("paligemma")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line usage error (subparsers inherit the class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Runs `func(args)` the way a command should end: see the module docstring."""
    debug = getattr(args, "debug", False)
    # Warnings (stale temporaries removed, malformed boxes), one line each, for this run only.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logger.addHandler(handler)
    try:
        with outputs.sigterm_as_interrupt():
            return func(args)
    except KeyboardInterrupt as e:
        if debug:
            traceback.print_exc()
        terminated = "SIGTERM" in str(e)
        print(f"interrupted ({'SIGTERM' if terminated else 'Ctrl-C'}): stopped; unfinished "
              "output removed", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except (OSError, ValueError, KeyError, LookupError, RuntimeError) as e:
        if debug:
            traceback.print_exc()
        print(f"error: {message(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug, not bad input: still one line
        if debug:
            traceback.print_exc()
        print(f"error: internal error ({type(e).__name__}: {message(e)}); rerun with --debug "
              "for the traceback and please report it", file=sys.stderr)
        return 3
    finally:
        logger.removeHandler(handler)


def message(e: BaseException) -> str:
    """One line: KeyError's quotes dropped, an OSError with its file named, newlines escaped."""
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        text = e.args[0]
    elif isinstance(e, OSError) and e.filename and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split("\n")).strip()


def add_debug_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true",
                   help="show the Python traceback of an error")
