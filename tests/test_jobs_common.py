"""One-line errors for bad input; a library's own ValueError keeps its traceback."""

from __future__ import annotations

import argparse
import logging

import numpy as np

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
