"""Strict parsing of the integers a client puts in query strings, headers and cursors.

``str.isdigit`` accepts ``"²"`` and ``int`` then raises; ``int`` also raises on
more than 4,300 digits, and a number past int64 breaks SQLite.  Every integer a
request carries is read here instead: ASCII digits only, at most 19 of them, and
within a range no wider than int64, or a :class:`ProtocolError` ``bad_message``
that names the parameter.  No I/O.
"""

from __future__ import annotations

import re
from typing import Final

from server.errors import ProtocolError

INT64_MAX: Final = 2**63 - 1
#: Digits of INT64_MAX: a longer run of digits is refused before it is converted.
MAX_DIGITS: Final = len(str(INT64_MAX))
_DIGITS: Final = re.compile(rf"[0-9]{{1,{MAX_DIGITS}}}", re.ASCII)
#: How much of a bad value an error message quotes.
QUOTED_CHARS: Final = 32


def parse_int(raw: str, name: str, *, minimum: int = 0, maximum: int = INT64_MAX) -> int:
    """The integer ``raw`` spells in ASCII digits, within ``minimum`` and ``maximum``.

    Surrounding whitespace is ignored; a sign, an underscore, any other digit
    than 0-9 and more than :data:`MAX_DIGITS` digits are not accepted.

    Raises:
        ProtocolError: ``bad_message``, naming ``name`` and the range.
    """
    text = raw.strip()
    if _DIGITS.fullmatch(text) is None:
        raise _out_of_range(raw, name, minimum, maximum)
    value = int(text)
    if not minimum <= value <= maximum:
        raise _out_of_range(raw, name, minimum, maximum)
    return value


def check_int(value: object, name: str, *, minimum: int = 0, maximum: int = INT64_MAX) -> int:
    """``value`` (decoded from JSON) when it is an integer within the range.

    Raises:
        ProtocolError: ``bad_message`` for a bool, a float, another type, or an
            integer out of the range.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        # No quote of the value: ``repr`` of a huge int raises.
        raise _out_of_range(None, name, minimum, maximum)
    return value


def _out_of_range(raw: str | None, name: str, minimum: int, maximum: int) -> ProtocolError:
    message = f"{name} must be an integer from {minimum} to {maximum}"
    if raw is not None:
        quoted = raw[:QUOTED_CHARS] + ("…" if len(raw) > QUOTED_CHARS else "")
        message += f", got {quoted!r}"
    return ProtocolError("bad_message", message)
