"""UUIDs as text: the one parser for every UUID vmmigrate reads (domain XML, cookies, the
host store, configuration).

libvirt reads every UUID with virUUIDParse, so we accept what it accepts: blanks around,
any number of '-' or ' ' between hex pairs, exactly 32 hex digits, any case. Output is
always the canonical lowercase 8-4-4-4-12 form, which is what names files in the host store
and what libvirt writes back.
"""

from __future__ import annotations

import re
import uuid as uuidlib

from vmmigrate.common.errors import InvalidArgument

# The C locale's isspace(): what virUUIDParse skips around the digits.
_C_SPACE = " \t\n\v\f\r"
_UUID_RE = re.compile(rf"[{_C_SPACE}]*((?:[- ]*[0-9a-fA-F]{{2}}){{16}})[{_C_SPACE}]*\Z")
_SEPARATORS = re.compile(r"[- ]")


def canonical_uuid_or_none(text: str) -> str | None:
    """``text`` as a canonical UUID, or None if virUUIDParse would refuse it."""
    if len(text) == 36 and text in _CANONICAL:  # the common case: already canonical
        return text
    m = _UUID_RE.match(text)
    if m is None:
        return None
    canonical = str(uuidlib.UUID(hex=_SEPARATORS.sub("", m.group(1))))
    if canonical == text:
        if len(_CANONICAL) >= _CANONICAL_MAX:
            _CANONICAL.clear()
        _CANONICAL.add(text)
    return canonical


# UUIDs seen in canonical form already (a domain's is checked on every phase of its
# migrations): answered without the regular expression and uuid.UUID. Bounded.
_CANONICAL: set[str] = set()
_CANONICAL_MAX = 16384


def same_uuid(a: str, b: str) -> bool:
    """Do two texts name the same UUID? Texts that are not UUIDs compare as they are."""
    return (canonical_uuid_or_none(a) or a) == (canonical_uuid_or_none(b) or b)


def require_uuid(text: str, what: str) -> str:
    """``text`` as a canonical UUID; InvalidArgument naming ``what`` ("domain uuid")."""
    u = canonical_uuid_or_none(text)
    if u is None:
        raise InvalidArgument(f"invalid {what} {text!r}")
    return u
