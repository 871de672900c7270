"""Errors a user can fix, from every layer, for the CLI and the orchestrator.

Each is printed as one line naming the field, value and fix (exit status 2);
anything else is a bug and keeps its traceback.

The bottom of the house: this module imports nothing of ours, so every layer
(mi/ included, which otherwise imports only torch) can subclass its base.
"""

from __future__ import annotations


class UserFixableError(Exception):
    """The base of every layer's user-fixable error (ConfigError, DataError,
    ModelError, RegularizerError, EstimatorError, CheckpointError, ReportError,
    UserError): the CLI and the orchestrator catch this one class."""


class UserError(UserFixableError):
    """An error the user can fix that belongs to no other layer."""


class RunFailed(Exception):
    """A run that failed for good (out of retries): one line with the cause and
    where the full trace is; the CLI exits with status 1."""


class Interrupted(Exception):
    """A run stopped by a signal (mi_scale/stopping.py): the CLI prints the
    line and exits 128 + signal (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, line: str, signum: int):
        super().__init__(line)
        self.signum = signum
