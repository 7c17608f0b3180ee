"""FieldError: a bad value, with the field it belongs to and the values that would be accepted.

Raised where `model/` validates what a user gave (sampling settings, actions, context) so
that every edge can name the field without parsing a message: the CLI prints `str(e)`, the
API (server/errors.py) answers a 4xx from `field`, `message` and `accepted`. A ValueError, so
code that catches ValueError (the CLI's user errors, older callers) still does.
"""

from __future__ import annotations

from typing import Any


class FieldError(ValueError):
    def __init__(self, field: str, message: str, accepted: Any = None) -> None:
        # str(e) is "field: message" plus the accepted values, for the CLI's one error line;
        # the API keeps them apart (`message` never repeats the list in `accepted`).
        listed = f" (accepted: {accepted})" if isinstance(accepted, list) else ""
        super().__init__(f"{field}: {message}{listed}")
        self.field, self.message, self.accepted = field, message, accepted


def one_of(field: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise FieldError(field, f"{value!r} is not an accepted value", list(accepted))


def in_range(field: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise FieldError(field, f"{value!r} is outside [{lo}, {hi}]")
