"""Format negotiation: which of a preset's formats a request's Accept field takes (RFC 9110 §12.5.1).

A preset made in several formats lists them preferred first, the fallback last. A request gets
the first format whose media type its Accept field names with a q-value above zero, and the
fallback otherwise. Wildcards (`*/*`, `image/*`) count for the fallback only: clients that
send them (curl, older browsers) cannot be trusted to decode AVIF or WebP, and nginx's `map`
on `$http_accept` in the README decides the same way.
"""

from __future__ import annotations

import re

from thumbcli.spec import CONTENT_TYPE_BY_FORMAT, FORMATS, Format

#: Distinct Accept fields remembered (browsers send a handful); past it the memo starts again.
MEMO_LIMIT = 512
_Q_ZERO = re.compile(rb"^q=0(\.0{0,3})?$")
_TYPES = {CONTENT_TYPE_BY_FORMAT[fmt].encode("ascii"): fmt for fmt in FORMATS}


def accepted_formats(accept: bytes) -> frozenset[Format]:
    """The formats whose media type an Accept field names explicitly with q > 0."""
    formats: set[Format] = set()
    for item in accept.split(b","):
        media_type, _, parameters = item.partition(b";")
        fmt = _TYPES.get(media_type.strip().lower())
        if fmt is None:
            continue
        weights = (parameter.replace(b" ", b"").lower() for parameter in parameters.split(b";"))
        if any(_Q_ZERO.match(weight) for weight in weights):
            formats.discard(fmt)
        else:
            formats.add(fmt)
    return frozenset(formats)


def candidates(formats: tuple[Format, ...], accepted: frozenset[Format]) -> tuple[Format, ...]:
    """The formats to try in order: each accepted one in the preset's order, then the fallback."""
    chosen = tuple(fmt for fmt in formats[:-1] if fmt in accepted)
    return (*chosen, formats[-1])


_NONE: tuple[frozenset[Format], bytes] = (frozenset(), b"\0")


class AcceptMemo:
    """Accept fields parsed once per worker: field bytes -> the accepted formats and a short key for them."""

    __slots__ = ("_memo",)

    def __init__(self) -> None:
        self._memo: dict[bytes, tuple[frozenset[Format], bytes]] = {}

    def formats(self, accept: bytes | None) -> tuple[frozenset[Format], bytes]:
        """The formats `accept` takes explicitly (none without the field), and a key naming that set."""
        if accept is None:
            return _NONE
        found = self._memo.get(accept)
        if found is None:
            if len(self._memo) >= MEMO_LIMIT:
                self._memo.clear()
            accepted = accepted_formats(accept)
            found = self._memo[accept] = (accepted, b"\0" + ",".join(sorted(accepted)).encode("ascii"))
        return found
