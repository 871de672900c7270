"""The data layer's user-facing error."""


class DataError(ValueError):
    """A user-fixable data problem; the message names the field, the value and a fix."""
