"""User-facing errors and the CLI wrapper that turns them into one-line messages.

Every check on user input (paths, checkpoints, caches, frames, flags) raises :class:`DecafError` with a message
that names the offending file or value and says what to do. Scripts run their ``main`` through :func:`run_cli`,
which prints ``error: <message>`` on one line and exits non-zero instead of showing a traceback from deep inside
a library.
"""
from __future__ import annotations

import sys
from typing import Callable, NoReturn, Sequence

#: exit status for a user error (bad input, missing file); distinct from Python's 1 for a crash
EXIT_USER_ERROR = 2
#: exit status when the run finished but some jobs failed (SPEC §10.9)
EXIT_JOBS_FAILED = 3


class DecafError(Exception):
    """An error caused by the user's input or environment; its message is one actionable line."""


class SettingError(DecafError):
    """A bad value of one run setting. The library speaks of the argument (``num_input_frames must be positive``),
    as a Python caller passed it; :func:`run_cli` speaks of the flag (``--num_input_frames must be positive``), as a
    script's user gave it. Setting names are the flag names (:mod:`model.settings`)."""

    def __init__(self, setting: str, problem: str):
        super().__init__(f"{setting} {problem}")
        self.setting, self.problem = setting, problem

    def as_flag(self) -> str:
        return f"--{self.setting} {self.problem}"


#: what the run in progress would say if interrupted now (set by :class:`model.utils.run_record.RunRecord`)
_interrupt_note: Callable[[], str] | None = None


def set_interrupt_note(note: Callable[[], str] | None) -> None:
    """Register the one line that Ctrl-C prints about the run in progress (None: nothing in progress)."""
    global _interrupt_note
    _interrupt_note = note


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Run a script's ``main`` and exit with its status; user errors become one line on stderr."""
    try:
        status = main(argv)
    except DecafError as exc:
        print(f"error: {exc.as_flag() if isinstance(exc, SettingError) else exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        note = _interrupt_note() if _interrupt_note is not None else "nothing half-written was kept"
        print(f"interrupted: {note}", file=sys.stderr)
        sys.exit(130)
    sys.exit(int(status or 0))
