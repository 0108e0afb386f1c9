"""Errors a user sees as one line on stderr, with the exit codes of docs/design.md ("Errors")."""


class DiffeditError(Exception):
    """Bad input or a failed job: one-line message, exit code 1."""

    exit_code = 1


class UsageError(DiffeditError):
    """Options that do not fit together: exit code 2."""

    exit_code = 2
