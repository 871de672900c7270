"""The data layer's user-facing error."""

from mi_scale.errors import UserFixableError


class DataError(UserFixableError, ValueError):
    """A user-fixable data problem; the message names the field, the value and a fix."""
