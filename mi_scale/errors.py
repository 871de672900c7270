"""Errors a user can fix, from every layer, for the CLI and the orchestrator.

Each is printed as one line naming the field, value and fix (exit status 2);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix that belongs to no other layer."""


def user_errors() -> tuple[type[BaseException], ...]:
    from mi_scale.config import ConfigError
    from mi_scale.data import DataError
    from mi_scale.mi import RegularizerError
    from mi_scale.mi.estimators import EstimatorError
    from mi_scale.models.errors import ModelError
    from mi_scale.train.checkpoint import CheckpointError
    return (ConfigError, UserError, DataError, ModelError, RegularizerError, EstimatorError, CheckpointError)


class RunFailed(Exception):
    """A run that failed for good (out of retries): one line with the cause and
    where the full trace is; the CLI exits with status 1."""


class Interrupted(Exception):
    """A run stopped by a signal (mi_scale/stopping.py): the CLI prints the
    line and exits 128 + signal (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, line: str, signum: int):
        super().__init__(line)
        self.signum = signum
