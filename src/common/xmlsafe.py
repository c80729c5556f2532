"""Hardened XML parsing for everything that arrives from outside (domain XML, cookies).

No DTD is loaded and none is accepted, no entity is expanded, nothing is fetched from the
network, the size and the nesting depth are bounded, and the text must be UTF-8.
"""

from __future__ import annotations

import re

from lxml import etree
from vmmigrate.common.errors import InvalidArgument

DEFAULT_MAX_DEPTH = 64

# Anything outside XML 1.0's Char production: no XML document can carry it, escaped or not
# (lxml refuses to write it, and a parser refuses to read it).
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def first_non_xml_char(value: str) -> str | None:
    """The first character of ``value`` that XML 1.0 cannot carry, or None."""
    m = _NOT_XML_CHAR.search(value)
    return None if m is None else m.group()


def _parser() -> etree.XMLParser:
    # A parser object is not safe to share between threads; they are cheap to build.
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_blank_text=False,
        collect_ids=False,
    )


def parse_untrusted(
    data: str | bytes,
    *,
    what: str,
    max_bytes: int,
    error: type[InvalidArgument],
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> etree._Element:
    """Parse ``data`` as one XML document; raise ``error`` with a clear message otherwise.

    ``what`` names the document in messages ("domain XML", "migration cookie").
    """
    if isinstance(data, str):
        try:
            raw = data.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise error(f"{what} is not valid UTF-8: {exc.reason}") from exc
    else:
        raw = bytes(data)
    if len(raw) > max_bytes:
        raise error(f"{what} is too large: {len(raw)} bytes (limit {max_bytes})")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not valid UTF-8 (byte {exc.start})") from exc
    if not raw.strip():
        raise error(f"{what} is empty")
    # Refuse any DTD before libxml2 sees it: domain XML and cookies never carry one, and
    # internal subsets are how entity bombs and external entities (XXE) arrive.
    upper = raw.upper()
    if b"<!DOCTYPE" in upper or b"<!ENTITY" in upper:
        raise error(f"{what} must not contain a DTD or entity declarations")
    try:
        root = etree.fromstring(raw, _parser())
    except etree.XMLSyntaxError as exc:
        raise error(f"malformed {what}: {exc.msg}") from exc
    if root is None:
        raise error(f"malformed {what}: no root element")
    if _deeper_than(root, max_depth):
        raise error(f"{what} nests too deeply (more than {max_depth} levels)")
    return root


_DEPTH_PROBES: dict[int, etree.XPath] = {}


def _deeper_than(root: etree._Element, limit: int) -> bool:
    """Does any node below ``root`` that is not text (an element, a comment, a processing
    instruction) sit more than ``limit`` levels deep, ``root`` being level 1? One compiled
    XPath, evaluated by libxml2: no Python loop over the tree."""
    probe = _DEPTH_PROBES.get(limit)
    if probe is None:
        if limit < 1:
            return True
        path = "/*" * limit + "/node()[not(self::text())]"
        probe = _DEPTH_PROBES[limit] = etree.XPath(f"boolean({path})")
    return bool(probe(root))
