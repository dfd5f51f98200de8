"""One-line errors for bad input; a library's own ValueError keeps its traceback."""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np
import pytest

from artifact_core.jobs_common import run_job
from artifact_core.metrics import best_threshold


def test_a_check_of_the_project_is_one_line_and_a_librarys_value_error_keeps_its_traceback(capsys):
    log = logging.getLogger("test")

    def bad_input(_):
        best_threshold([], [])  # the project's own check: "cannot tune a threshold on an empty ..."

    assert run_job(bad_input, argparse.Namespace(), log) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: cannot tune a threshold on an empty validation set"

    def library_bug(_):
        np.zeros(3).reshape(2, 2)  # numpy raises ValueError from its own code

    assert run_job(library_bug, argparse.Namespace(), log) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "library_bug" in err
    assert err.rstrip().splitlines()[-1].startswith("error: cannot reshape array")

    def python_library_bug(_):
        import pandas as pd

        pd.DataFrame({"a": [1, 2], "b": [1]})  # pandas raises from its own Python code, in the venv

    assert run_job(python_library_bug, argparse.Namespace(), log) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "pandas" in err


def test_credentials_in_uris_stay_out_of_error_lines_and_logs(capsys):
    """Messages name folders as typed: a key in a URI is blanked in the job's error line, in a
    library error's traceback and in the log records of every handler the job set up."""
    from artifact_core.jobs_common import RedactingFormatter

    log = logging.getLogger("test")

    def conflict(_):
        raise FileExistsError("output s3://AKIA:TOPSECRET@bucket/preds already holds a scoring run")

    assert run_job(conflict, argparse.Namespace(), log) == 2
    err = capsys.readouterr().err
    assert "TOPSECRET" not in err and "AKIA" not in err and "s3://***@bucket/preds" in err

    def library_bug(_):
        np.zeros(3).reshape(2, 2 if "s3://K:TOPSECRET@b/x" else 1)  # the URI is in the traceback's line

    run_job(library_bug, argparse.Namespace(), log)
    err = capsys.readouterr().err
    assert "Traceback" in err and "TOPSECRET" not in err
    handlers = logging.getLogger().handlers
    assert handlers and all(isinstance(h.formatter, RedactingFormatter) for h in handlers)
    try:
        raise OSError("cannot read s3://AKIA:abc/dEf+TOPSECRET@bucket/x")  # a key with '/' and '+', unescaped
    except OSError:
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "%d image file(s) under %s",
                                   (3, "s3://b/in?secret_key=TOPSECRET&region=x"), sys.exc_info())
    line = RedactingFormatter(logging.Formatter()).format(record)
    assert "3 image file(s) under s3://b/in?secret_key=***&region=x" in line
    assert "Traceback" in line and "s3://***@bucket/x" in line and "TOPSECRET" not in line
    # a malformed log call is still logging's own error, reported by the handler, not raised
    bad = logging.LogRecord("x", logging.INFO, __file__, 1, "%d files", ("x",), None)
    with pytest.raises(TypeError):
        RedactingFormatter(logging.Formatter()).format(bad)  # (Handler.emit catches this: handleError)
