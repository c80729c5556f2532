"""An XML serializer that writes the way libvirt does.

libvirt writes attributes in single quotes and escapes all five special characters in text
and attributes alike (virBufferEscapeString), which lxml's ``tostring`` does not; documents
we relay to libvirt, or compare byte for byte with its own, are written here instead.

Whitespace-only text can be re-indented on the way (``delta``), so that an element cut out
of one document can stand alone and be put back into another at a different depth, byte for
byte. Text with anything but blanks is content and is never touched.

Strings that hold characters XML 1.0 cannot carry are refused with the caller's error class
(libvirt silently drops them, which would change a name the peer checks against).
"""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree
from vmmigrate.common.errors import InvalidArgument
from vmmigrate.common.xmlsafe import first_non_xml_char

__all__ = ["XmlWriter", "qualified_name", "reindent"]

_XML_NS = "http://www.w3.org/XML/1998/namespace"

# \r (and in attributes \t and \n) become references because an XML parser would normalise
# them away.
_TEXT_ESCAPES = str.maketrans(
    {"&": "&amp;", "<": "&lt;", ">": "&gt;", "'": "&apos;", '"': "&quot;", "\r": "&#13;"}
)
_ATTR_ESCAPES = str.maketrans(
    {
        "&": "&amp;",
        "<": "&lt;",
        ">": "&gt;",
        "'": "&apos;",
        '"': "&quot;",
        "\r": "&#13;",
        "\n": "&#10;",
        "\t": "&#9;",
    }
)


def qualified_name(el: etree._Element) -> str:
    """``prefix:local`` as written in the document (lxml keeps ``{uri}local``)."""
    local = etree.QName(el).localname
    return local if el.prefix is None else f"{el.prefix}:{local}"


def reindent(text: str, delta: int) -> str:
    """Shift the indentation after the last newline of whitespace-only text by ``delta``.

    Text with anything but blanks is content and is never touched. Removing only happens when
    the full amount is there, so adding after removing always gives back the original.
    """
    if "\n" not in text or text.strip(" \t\r\n"):
        return text
    cut = text.rfind("\n") + 1
    head, indent = text[:cut], text[cut:]
    if delta > 0:
        return head + " " * delta + indent
    if indent.startswith(" " * -delta):
        return head + indent[-delta:]
    return text


@dataclass(frozen=True)
class XmlWriter:
    """Writes into one kind of document: ``what`` names it in errors ("migration cookie"),
    ``error`` is the class they are raised with."""

    what: str
    error: type[InvalidArgument]

    def _check_chars(self, value: str) -> None:
        bad = first_non_xml_char(value)
        if bad is not None:
            raise self.error(f"cannot put character U+{ord(bad):04X} into a {self.what}: {value!r}")

    def text(self, value: str) -> str:
        """``value`` escaped as element text."""
        self._check_chars(value)
        return value.translate(_TEXT_ESCAPES)

    def attr(self, value: str) -> str:
        """``value`` escaped for a single-quoted attribute."""
        self._check_chars(value)
        return value.translate(_ATTR_ESCAPES)

    def element(
        self,
        el: etree._Element,
        out: list[str],
        delta: int,
        parent_nsmap: dict[str | None, str] | None = None,
    ) -> None:
        """Serialize ``el`` (without its tail) into ``out``.

        ``parent_nsmap`` None marks the top element, which declares every namespace in scope
        so that the text stands alone. ``delta`` shifts the indentation of whitespace-only
        text (see :func:`reindent`).
        """
        name = qualified_name(el)
        out.append("<" + name)
        nsmap = el.nsmap
        for key, value in el.attrib.items():
            out.append(f" {self._attr_name(str(key), nsmap)}='{self.attr(str(value))}'")
        # Declarations after the attributes, where libvirt writes them (<domain type=..
        # xmlns:..>).
        inherited = parent_nsmap or {}
        for prefix, uri in nsmap.items():
            if parent_nsmap is None or inherited.get(prefix) != uri:
                attr = "xmlns" if prefix is None else f"xmlns:{prefix}"
                out.append(f" {attr}='{self.attr(uri)}'")
        if None in inherited and None not in nsmap:
            out.append(" xmlns=''")  # an undeclared default namespace
        children = list(el)
        if el.text is None and not children:
            out.append("/>")
            return
        out.append(">")
        if el.text:
            out.append(self.text(reindent(el.text, delta)))
        for child in children:
            if isinstance(child.tag, str):
                self.element(child, out, delta, nsmap)
            else:  # comment, processing instruction or entity: lxml writes these verbatim
                out.append(etree.tostring(child, encoding="unicode", with_tail=False))
            if child.tail:
                out.append(self.text(reindent(child.tail, delta)))
        out.append(f"</{name}>")

    def _attr_name(self, key: str, nsmap: dict[str | None, str]) -> str:
        if not key.startswith("{"):
            return key
        uri, local = key[1:].split("}", 1)
        if uri == _XML_NS:
            return f"xml:{local}"
        for prefix, candidate in nsmap.items():
            if candidate == uri and prefix is not None:
                return f"{prefix}:{local}"
        # not reachable from parsed XML: lxml always has a prefix for a namespaced attribute
        raise self.error(f"no namespace prefix for attribute {key}")
