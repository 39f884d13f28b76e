"""Errors a person can read (issue [api]): the command-line entry points print a user error as ``<prog>: error: ...``
(the message names the file or option, the expected and the actual value) and exit with status 2, without a
traceback; ``--debug`` anywhere on the command line shows the traceback instead. A malformed YAML file given with
``--config`` is reported with its path, line and column before anything else runs, and option errors come without
the usage text (``--help`` prints it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

#: What a user can cause and fix: missing or existing files, bad values, bad options. Anything else is a bug and
#: keeps its traceback.
USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError)
USER_ERRORS += (argparse.ArgumentError,)
DEBUG_FLAG = "--debug"


def config_files(argv: list[str]) -> list[str]:
    """The files given with ``--config FILE``, ``--config=FILE`` or ``-c FILE``."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def check_yaml(path: str | Path) -> None:
    """Parse one YAML file; a syntax error is raised as ``ValueError("<path>, line L, column C: <problem>")``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config: no such file: {path}")
    try:
        yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as err:
        mark, context = err.problem_mark or err.context_mark, ""
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        if err.context and err.context_mark is not None and err.context_mark is not mark:
            context = f" ({err.context} at line {err.context_mark.line + 1}, column {err.context_mark.column + 1})"
        raise ValueError(f"{path}{where}: invalid YAML: {err.problem or err.context}{context}") from err
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: invalid YAML: {err}") from err


def strip_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``, and whether it was there."""
    return [a for a in argv if a != DEBUG_FLAG], DEBUG_FLAG in argv


def run_command(prog: str, command: Callable[[], object], argv: list[str], *, debug: bool) -> None:
    """Check the ``--config`` files of ``argv``, run ``command()``, and turn a user error into two lines on stderr
    and exit status 2; with ``debug`` the exception propagates with its traceback."""
    try:
        for path in config_files(argv):
            check_yaml(path)
        command()
    except USER_ERRORS as err:
        if debug:
            raise
        message = str(err).strip() or type(err).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        print(f"{prog}: (run with {DEBUG_FLAG} for the traceback, --help for the options)", file=sys.stderr)
        raise SystemExit(2) from None
