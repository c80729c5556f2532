"""The simvm migration stream: a format of our own, carried over one TCP connection.

Source to destination (all integers little-endian)::

    header   magic "SIMVMRAM" | u16 version (1) | u16 flags (0) | u32 page size
             | u64 page count | 16 bytes VM uuid                              (40 bytes)
    records, each opened by a one-byte tag:
      'P'  page batch   u32 n | n entries (u32 page index, u32 CRC32, u8 kind)
                        | the data of the entries of kind NORMAL, in entry order
                        kind NORMAL (0): a page of data follows in the data block
                        kind ZERO   (1): an all-zero page, no data ("duplicate" in QEMU's
                                         statistics); its CRC32 is that of a zero page
      'I'  end of pass  u32 pass number (1 = the full first pass) | u32 pages in the pass
                        | u8 final (1: the source VM is stopped, memory is complete;
                        only 'E' may follow)
      'E'  end          32 bytes: sha256 of the whole guest memory after the final pass

Destination to source (the return path)::

      0x06 ACK          the memory arrived and its sha256 matches the declared one
      0x15 NAK          u16 length | UTF-8 reason: the destination refuses the stream

Every check is the destination's: a bad magic or version, a page CRC that does not match,
a pass whose number or page count differs from what arrived, a page index out of range, an
unknown tag, a record after the final pass, an end of stream before 'E', or a final sha256
that differs, each raise :class:`StreamError`. Corruption the CRCs cannot see (a flipped
bit in a page index lands a good page in the wrong place) is caught by the final sha256.

Nothing here touches a socket except :func:`read_return_path`: the encoder works on a
memoryview of guest memory and the loader on any binary file, so both are testable
in-process.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import socket
import struct
import uuid as uuidlib
import zlib
from collections.abc import Callable, Sequence

MAGIC = b"SIMVMRAM"
VERSION = 1
PAGE_SIZE = 4096

TAG_PAGES = b"P"
TAG_END_OF_PASS = b"I"
TAG_END = b"E"
ACK = b"\x06"
NAK = b"\x15"

HEADER = struct.Struct("<8sHHIQ16s")
BATCH_HEAD = struct.Struct("<I")
ENTRY = struct.Struct("<IIB")
END_OF_PASS = struct.Struct("<IIB")
NAK_HEAD = struct.Struct("<H")
SHA256_LEN = 32

# A batch larger than this is refused before allocating for it: a corrupted count must not
# make the destination allocate gigabytes.
MAX_BATCH_PAGES = 4096


class StreamError(Exception):
    """The stream is malformed, corrupted, truncated or refused."""


class PageKind(enum.IntEnum):
    NORMAL = 0  # data follows in the batch's data block
    ZERO = 1  # all-zero page, no data on the wire


@dataclasses.dataclass(frozen=True)
class Header:
    page_size: int
    page_count: int
    vm_uuid: str

    def pack(self) -> bytes:
        return HEADER.pack(
            MAGIC, VERSION, 0, self.page_size, self.page_count, uuidlib.UUID(self.vm_uuid).bytes
        )

    @classmethod
    def parse(cls, raw: bytes) -> Header:
        magic, version, _flags, page_size, page_count, ubytes = HEADER.unpack(raw)
        if magic != MAGIC:
            raise StreamError(f"not a simvm migration stream (magic {magic!r})")
        if version != VERSION:
            raise StreamError(f"unsupported stream version {version} (this simvm speaks {VERSION})")
        return cls(page_size, page_count, str(uuidlib.UUID(bytes=ubytes)))


@dataclasses.dataclass(frozen=True)
class Batch:
    """One encoded page batch: ``head`` then ``data`` go on the wire."""

    head: bytes
    data: memoryview
    normal: int  # pages sent with data
    zero: int  # all-zero pages sent as an index only

    @property
    def wire_bytes(self) -> int:
        return len(self.head) + len(self.data)


ZERO_PAGE = bytes(PAGE_SIZE)
ZERO_CRC = zlib.crc32(ZERO_PAGE)


def encode_batch(
    memory: memoryview, pages: Sequence[int], out: memoryview, page_size: int = PAGE_SIZE
) -> Batch:
    """Copy ``pages`` out of ``memory`` into ``out`` and encode them as one 'P' record.

    The pages are copied first and the CRCs computed on the copy, so a vCPU writing a page
    meanwhile can never make a CRC disagree with the data sent (the page is dirty again
    and goes in a later pass). ``out`` is reused from batch to batch (a fresh buffer per
    batch costs more in page faults than the copy itself); ``Batch.data`` points into it.
    """
    n = len(pages)
    if n > MAX_BATCH_PAGES or len(out) < n * page_size:
        raise ValueError(f"batch of {n} pages does not fit")
    if n and pages[-1] - pages[0] == n - 1:
        start = pages[0] * page_size  # a contiguous run (the first pass): one copy
        out[: n * page_size] = memory[start : start + n * page_size]
    else:
        for i, page in enumerate(pages):
            out[i * page_size : (i + 1) * page_size] = memory[
                page * page_size : (page + 1) * page_size
            ]
    zero_page = ZERO_PAGE if page_size == PAGE_SIZE else bytes(page_size)
    head = bytearray(1 + BATCH_HEAD.size + ENTRY.size * n)
    head[0:1] = TAG_PAGES
    BATCH_HEAD.pack_into(head, 1, n)
    pos = 1 + BATCH_HEAD.size
    kept = 0  # normal pages so far; once a zero page is seen they move down in ``out``
    for i, page in enumerate(pages):
        chunk = out[i * page_size : (i + 1) * page_size]
        crc = zlib.crc32(chunk)
        if chunk == zero_page:
            ENTRY.pack_into(head, pos, page, crc, PageKind.ZERO)
        else:
            ENTRY.pack_into(head, pos, page, crc, PageKind.NORMAL)
            if kept != i:
                out[kept * page_size : (kept + 1) * page_size] = chunk
            kept += 1
        pos += ENTRY.size
    return Batch(bytes(head), out[: kept * page_size], kept, n - kept)


def encode_end_of_pass(number: int, pages: int, *, final: bool) -> bytes:
    return TAG_END_OF_PASS + END_OF_PASS.pack(number, pages, int(final))


def encode_end(sha256: bytes) -> bytes:
    if len(sha256) != SHA256_LEN:
        raise ValueError("sha256 digest must be 32 bytes")
    return TAG_END + sha256


def encode_nak(reason: str) -> bytes:
    raw = reason.encode("utf-8", "replace")[:0xFFFF]
    return NAK + NAK_HEAD.pack(len(raw)) + raw


class StreamReader:
    """Exact reads from a byte stream (a socket's buffered file); EOF is a StreamError."""

    def __init__(self, raw: io.BufferedIOBase) -> None:
        self._raw = raw
        self.received = 0

    def read(self, n: int) -> bytes:
        data = self._raw.read(n)
        if data is None or len(data) != n:
            got = 0 if data is None else len(data)
            raise StreamError(f"stream ended early: wanted {n} bytes, got {got}")
        self.received += n
        return data

    def read_into(self, buf: memoryview) -> None:
        filled = 0
        while filled < len(buf):
            n = self._raw.readinto(buf[filled:])
            if not n:
                raise StreamError(f"stream ended early: wanted {len(buf)} bytes, got {filled}")
            filled += n
        self.received += filled


class Loader:
    """The destination's decoder: applies a stream to ``memory``, checking everything.

    When the final pass ends, the loader hashes memory at once (the source hashes its own
    meanwhile, so the two hashes overlap and the downtime pays for about one), then checks
    the digest in 'E' against it. :meth:`run` returns the checked digest.
    """

    def __init__(self, reader: StreamReader, memory: memoryview, header: Header) -> None:
        self._reader = reader
        self._memory = memory
        self._ps = header.page_size
        self._count = header.page_count
        self._scratch = memoryview(bytearray(MAX_BATCH_PAGES * header.page_size))
        self.passes = 0
        self.pages_loaded = 0
        self._in_pass = 0

    def run(self, sha256_of_memory: Callable[[], bytes]) -> bytes:
        """Read records until 'E'; ``sha256_of_memory`` digests memory after the final pass."""
        actual: bytes | None = None
        while True:
            tag = self._reader.read(1)
            if actual is not None and tag != TAG_END:
                raise StreamError(f"record {tag!r} after the final pass")
            if tag == TAG_PAGES:
                self._load_batch()
            elif tag == TAG_END_OF_PASS:
                if self._end_of_pass():
                    actual = sha256_of_memory()
            elif tag == TAG_END:
                declared = self._reader.read(SHA256_LEN)
                if actual is None:
                    raise StreamError("end of stream before the final pass")
                if actual != declared:
                    raise StreamError(
                        f"memory checksum mismatch: source declared {declared.hex()}, "
                        f"memory has {actual.hex()}"
                    )
                return declared
            else:
                raise StreamError(f"invalid record tag {tag!r}")

    def _end_of_pass(self) -> bool:
        number, pages, final = END_OF_PASS.unpack(self._reader.read(END_OF_PASS.size))
        if number != self.passes + 1:
            raise StreamError(f"pass {number} ended, expected pass {self.passes + 1}")
        if pages != self._in_pass:
            raise StreamError(f"pass {number} announced {pages} pages but {self._in_pass} arrived")
        if final not in (0, 1):
            raise StreamError(f"pass {number}: invalid final flag {final}")
        self.passes = number
        self._in_pass = 0
        return bool(final)

    def _load_batch(self) -> None:
        (n,) = BATCH_HEAD.unpack(self._reader.read(BATCH_HEAD.size))
        if not 0 < n <= MAX_BATCH_PAGES:
            raise StreamError(f"invalid page batch size {n}")
        table = self._reader.read(ENTRY.size * n)
        entries = [ENTRY.unpack_from(table, i * ENTRY.size) for i in range(n)]
        for index, _crc, kind in entries:
            if index >= self._count:
                raise StreamError(f"page index {index} out of range (guest has {self._count})")
            if kind not in (PageKind.NORMAL, PageKind.ZERO):
                raise StreamError(f"page {index}: invalid page kind {kind}")
        ps = self._ps
        mem = self._memory
        first = entries[0][0]
        normal = sum(1 for _, _, kind in entries if kind == PageKind.NORMAL)
        # a contiguous run of data pages (the first pass) goes straight into guest memory
        # and is checked in place: a bad page fails the whole migration anyway
        direct = normal == n and entries[-1][0] - first == n - 1
        data = mem[first * ps : (first + n) * ps] if direct else self._scratch[: normal * ps]
        self._reader.read_into(data)
        slot = 0
        for index, crc, kind in entries:
            if kind == PageKind.ZERO:
                if crc != ZERO_CRC:
                    raise StreamError(f"page {index}: CRC32 mismatch on a zero page")
                mem[index * ps : (index + 1) * ps] = ZERO_PAGE if ps == PAGE_SIZE else bytes(ps)
                continue
            page = data[slot * ps : (slot + 1) * ps]
            slot += 1
            if zlib.crc32(page) != crc:
                raise StreamError(f"page {index}: CRC32 mismatch (corrupted page data)")
            if not direct:
                mem[index * ps : (index + 1) * ps] = page
        self._in_pass += n
        self.pages_loaded += n


def read_return_path(sock: socket.socket) -> tuple[bool, str]:
    """Block for the destination's verdict: (True, "") on ACK, (False, reason) otherwise."""
    tag = _recv_exact(sock, 1)
    if tag == ACK:
        return True, ""
    if tag == NAK:
        (n,) = NAK_HEAD.unpack(_recv_exact(sock, NAK_HEAD.size))
        return False, _recv_exact(sock, n).decode("utf-8", "replace")
    if not tag:
        return False, ""
    return False, f"invalid return-path byte {tag!r}"


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    parts: list[bytes] = []
    left = n
    while left:
        chunk = sock.recv(left)
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)
