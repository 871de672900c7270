"""The one error type models raise for problems a user can fix."""

from __future__ import annotations

import difflib
from typing import Any, Iterable

from mi_scale.errors import UserFixableError


class ModelError(UserFixableError, ValueError):
    """A user-fixable model problem; the message names the field, the value and the fix."""


def invalid(field: str, value: Any, hint: str) -> ModelError:
    """`model.preset: invalid value 'x': <hint>`, the same shape as config errors."""
    return ModelError(f"{field}: invalid value {value!r}: {hint}")


def unknown_choice(field: str, value: Any, choices: Iterable[str]) -> ModelError:
    """An invalid-choice error listing the choices, with a close-match suggestion."""
    choices = list(choices)
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return invalid(field, value, f"expected one of {', '.join(repr(c) for c in choices)}{hint}")
