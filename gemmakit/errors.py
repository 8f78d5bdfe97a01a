"""The error hierarchy: every exception gemmakit raises on purpose derives from `GemmakitError`.

Where it sits: at the bottom (rank 0, no imports), so any module can raise these and the CLI and the
server catch them once. `UserError` marks what the user can fix (a bad path, field, value or file):
the CLI prints its message as one line and exits 2; anything else is a bug and keeps its traceback.

Key trade-off: each module keeps its own named subclass (`CheckpointError`, `LoraError`, ...) so a
message and a test can say where it came from, while callers catch the one base. Subclasses also keep
the builtin base they had (`ValueError` or `RuntimeError`) so `except ValueError` code keeps working.
"""

from __future__ import annotations


class GemmakitError(Exception):
    """Base of every exception gemmakit raises deliberately."""


class UserError(GemmakitError, ValueError):
    """Bad input the user can fix; the message is one line naming the file, field or value and what
    was expected. The CLI prints it without a traceback and exits with status 2."""
