"""What every job entry script shares: logging set-up and one-line errors for users (a plain
``ValueError`` from inside a library keeps its traceback: more likely a bug than bad input)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Callable

# Torch-free imports only: the scoring job's driver never needs torch (ONNX engine).
from artifact_core.data import FolderListingError
from artifact_core.errors import WeightsUnavailableError
from artifact_core.images import ImageDecodeError
from artifact_core.raycluster import ClusterTooSmallError
from artifact_core.storage import redact_text

# Errors that are the user's input, not a bug: one clear line, no stack dump.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError, PermissionError,
               WeightsUnavailableError, ClusterTooSmallError, ImageDecodeError, FolderListingError)


def _user_error(exc: BaseException) -> BaseException | None:
    """The user-facing cause inside ``exc`` (Ray wraps worker errors), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, USER_ERRORS):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _raised_outside_project(exc: BaseException) -> bool:
    """Whether a plain ``ValueError`` came from a library (numpy, torch, pyarrow...) rather
    than from a ``raise`` of this project's checks: then it is more likely a bug than bad input."""
    if type(exc) is not ValueError or exc.__traceback__ is None:
        return False
    last = traceback.extract_tb(exc.__traceback__)[-1]
    package = os.path.dirname(os.path.abspath(__file__))
    # This package and the job scripts beside it (a checkout), not whatever else lives there (a venv)
    ours = tuple(d + os.sep for d in (package, os.path.join(os.path.dirname(package), "jobs")))
    # (a library written in C raises from the calling line of our code, which is no raise)
    return not (os.path.abspath(last.filename).startswith(ours) and (last.line or "").lstrip().startswith("raise "))


class RedactingFormatter(logging.Formatter):
    """Another formatter's lines with the credentials of any URI in them blanked (messages name
    folders as the user typed them), tracebacks included. Formatting runs inside the handler's
    own error handling, so a malformed log call is reported as logging always reports it."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(self.inner.format(record))


def redact_logs(*loggers: logging.Logger) -> None:
    """Give every handler of ``loggers`` (default: the root logger and Ray's, which do not
    pass their records up) a :class:`RedactingFormatter` over its formatter."""
    for lg in loggers or (logging.getLogger(), logging.getLogger("ray")):
        for handler in lg.handlers:
            if not isinstance(handler.formatter, RedactingFormatter):
                handler.setFormatter(RedactingFormatter(handler.formatter))


def run_job(main: Callable[[argparse.Namespace], None], args: argparse.Namespace,
            logger: logging.Logger) -> int:
    """Configure logging, run ``main(args)``, turn user errors into one line and exit code 2
    (a library's plain ``ValueError`` with its traceback above that line)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    redact_logs()
    try:
        main(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - sorted into user errors and bugs below
        cause = _user_error(exc)
        if cause is None:
            raise
        if _raised_outside_project(cause):
            # One line would hide where it came from: the traceback goes with it.
            print(redact_text("".join(traceback.format_exception(cause))), end="", file=sys.stderr)
        else:
            logger.debug("details", exc_info=True)
        # Paths in messages are the URIs as typed: a key in one stays out of the job's log.
        print(f"error: {redact_text(str(cause))}", file=sys.stderr)
        return 2
    return 0
