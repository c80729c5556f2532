"""Fuzzing every field of every RPC against real daemons (shared by tests/fuzz and
scripts/fuzz.py).

A :class:`Lab` is two hosts (A: srcd + dstd on 127.0.0.6, B on 127.0.0.7), real processes
started by tests/helpers/hosts.py, with two inactive domains defined on A. Each case takes a
valid request for one RPC (:data:`CATALOG`), replaces one to three of its leaf fields with
hostile values (random and huge text and bytes, paths, mutated cookies and domain XML,
extreme integers), sends it, and checks:

* the answer is OK or a clean status: never UNKNOWN, never INTERNAL without our error class
  (an unhandled exception), never an empty message, never a hang;
* both daemons are still alive and serving;
* a refused request changed nothing on disk (domain definitions, the job journal, emulator
  runtime records); an accepted one is legitimately valid, so the lab is put back
  (:meth:`Lab.reconcile`: jobs cancelled, extra domains undefined, missing ones defined)
  and must then match its baseline exactly.

:func:`raw_case` sends arbitrary bytes as the serialized request of any method, so protobuf
decode failures are covered too.

Safety: address fields (dest_uri, migrate_uri, listen_address) only ever get loopback
addresses or strings that no resolver is asked about: the fuzzer sends nothing off this host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import time
import uuid as uuidlib
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor as pbd
from google.protobuf.message import Message
from hypothesis import strategies as st
from vmmigrate.common import tunnelwire
from vmmigrate.common.cookie import MigrationCookie, format_cookie
from vmmigrate.common.errors import ERROR_CLASS_KEY
from vmmigrate.common.flags import MigrateFlag

from vmmigrate.v1 import vmmigrate_pb2 as pb

from ..helpers.hosts import Host, sample_domain_xml
from .parsers import FRAGMENTS, Crash, mutated

OFFLINE = int(MigrateFlag.OFFLINE | MigrateFlag.PERSIST_DEST)
OFFLINE_P2P = OFFLINE | int(MigrateFlag.PEER2PEER)
LIVE_P2P = int(MigrateFlag.LIVE | MigrateFlag.PERSIST_DEST | MigrateFlag.PEER2PEER)
TUNNEL_P2P = LIVE_P2P | int(MigrateFlag.TUNNELLED)

RPC_TIMEOUT = 30.0
CHANNEL_OPTIONS = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]
ALPHA, BETA = "fz-alpha", "fz-beta"
_ids = itertools.count()


def new_mid() -> str:
    return f"fz-{uuidlib.uuid4().hex[:12]}-{next(_ids)}"


# ---------------------------------------------------------------------------------------
# The lab: two hosts, their channels, their baseline


class Lab:
    def __init__(self, workdir: Path) -> None:
        self.a = Host("A", "127.0.0.6", workdir / "A")
        self.b = Host("B", "127.0.0.7", workdir / "B")
        try:
            self._start()
        except BaseException:
            self.a.stop()
            self.b.stop()
            raise

    def _start(self) -> None:
        self.a.start()
        self.b.start()
        self.channels = {
            addr: grpc.insecure_channel(addr, options=CHANNEL_OPTIONS)
            for addr in (self.a.src, self.a.dst, self.b.src, self.b.dst)
        }
        self.uuids = {ALPHA: str(uuidlib.uuid4()), BETA: str(uuidlib.uuid4())}
        self.xml = {n: sample_domain_xml(n, u) for n, u in self.uuids.items()}
        # what Define sends: defined nowhere, always the same (draws must not depend on
        # anything random outside hypothesis)
        self.new_xml = sample_domain_xml("fz-gamma", str(uuidlib.uuid4()))
        for xml in self.xml.values():
            self.unary(self.a.src, "DomainService", "Define", pb.DefineRequest(xml=xml))
        caps = self.unary(
            self.a.dst, "MigrationDestinationService", "GetCapabilities", pb.CapabilitiesRequest()
        )
        self.a_hostuuid = caps.host_uuid
        self.baseline = {k: v for k, v in self.snapshot().items() if "/outcomes/" not in k}
        self.inputs = 0

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()
        self.a.stop()
        self.b.stop()

    # -- calls

    def method(self, addr: str, service: str, method: str, resp: Any) -> Any:
        return self.channels[addr].unary_unary(
            f"/vmmigrate.v1.{service}/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=resp.FromString if resp is not None else None,
        )

    def unary(self, addr: str, service: str, method: str, request: Message) -> Any:
        resp = RESPONSES[(service, method)]
        return self.method(addr, service, method, resp)(request, timeout=RPC_TIMEOUT)

    def alpha_cookie(self) -> bytes:
        return format_cookie(
            MigrationCookie(
                name=ALPHA, uuid=self.uuids[ALPHA], hostname="A", hostuuid=self.a_hostuuid
            )
        )

    # -- state

    def snapshot(self) -> dict[str, str]:
        """What a request must not change: every file of both hosts' state dirs except the
        locks (flock files and the listing generation counter) and emulator logs."""
        out: dict[str, str] = {}
        for h in (self.a, self.b):
            for p in sorted(h.state_dir.rglob("*")):
                rel = p.relative_to(h.state_dir)
                # the history and the event log are reports: an accepted request adds to them
                if rel.parts[0] in ("locks", "history") or ".log" in p.suffixes or not p.is_file():
                    continue
                try:
                    out[f"{h.name}/{rel}"] = hashlib.sha256(p.read_bytes()).hexdigest()
                except FileNotFoundError:
                    continue
        return out

    def alive(self) -> None:
        for h in (self.a, self.b):
            for d in (h.srcd, h.dstd):
                assert d is not None
                if d.proc.poll() is not None:
                    raise Crash(f"{h.name} {d.kind} died ({d.proc.returncode}):\n{d.output()[-3000:]}")

    def reconcile(self) -> None:
        """Put the lab back to its baseline after a request that was accepted (or a setup)."""
        for h in (self.a, self.b):
            for path in h.journal():
                try:
                    rec = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                hdr = pb.PhaseHeader(migration_id=rec["migration_id"], flags=rec["flags"])
                with contextlib.suppress(grpc.RpcError):
                    if rec["role"] == "source":
                        self.unary(h.src, "MigrationSourceService", "Confirm", pb.ConfirmRequest(
                            header=hdr, domain=rec["domain_name"], cancelled=True))
                    else:
                        self.unary(h.dst, "MigrationDestinationService", "Finish",
                                   pb.FinishRequest(header=hdr, dest_name=rec["domain_name"],
                                                    cancelled=True))
            listed = self.unary(h.src, "DomainService", "List", pb.ListRequest(all=True))
            expected = set(self.xml) if h is self.a else set()
            for entry in listed.domains:
                key = entry.domain.uuid
                if entry.state != pb.DOMAIN_STATE_SHUTOFF:
                    self._quiet(h.src, "Destroy", pb.DomainRequest(domain=key))
                if entry.domain.name not in expected or self.uuids.get(entry.domain.name) != key:
                    self._quiet(h.src, "Undefine", pb.UndefineRequest(domain=key))
            names = {e.domain.name for e in listed.domains}
            for name in expected:
                if name not in names:
                    self.unary(h.src, "DomainService", "Define", pb.DefineRequest(xml=self.xml[name]))

    def recover(self) -> None:
        """reconcile(), as far as it goes (after a crash a daemon may be gone)."""
        with contextlib.suppress(Exception):
            self.reconcile()

    def _quiet(self, addr: str, method: str, request: Message) -> None:
        with contextlib.suppress(grpc.RpcError):
            self.unary(addr, "DomainService", method, request)

    def settle(self, before: dict[str, str], what: str, may_vanish: Collection[str] = ()) -> None:
        """The state must be ``before`` (allowing emulators a moment to go), except that
        the files named in ``may_vanish`` may be gone. Against the baseline, the answers
        kept for Finish retries (``outcomes/``, written by every Finish that ran, the
        lab's own cancels included, and expired by dstd) do not count."""
        end = time.monotonic() + 5.0
        while True:
            now = self.snapshot()
            if before is self.baseline:
                now = {k: v for k, v in now.items() if "/outcomes/" not in k}
            if now == before or now == {k: v for k, v in before.items() if k not in may_vanish}:
                return
            if time.monotonic() > end:
                diff = sorted(set(now.items()) ^ set(before.items()))
                raise Crash(f"{what}: state changed: {diff[:6]}")
            time.sleep(0.05)


# ---------------------------------------------------------------------------------------
# The catalog: one valid request per RPC (a setup may prepare the peer state it needs)


@dataclasses.dataclass(frozen=True)
class Rpc:
    service: str
    method: str
    request: type[Message]
    host: str  # "A" or "B"
    daemon: str  # "src" or "dst"
    base: Callable[[Lab, str], Message]  # (lab, the migration id of the setup, if any)
    setup: Callable[[Lab], str] | None = None  # a Begin or a Prepare the request refers to
    variant: str = ""  # when one RPC has several valid bases

    @property
    def name(self) -> str:
        return f"{self.service}.{self.method}" + (f"[{self.variant}]" if self.variant else "")

    def address(self, lab: Lab) -> str:
        h = lab.a if self.host == "A" else lab.b
        return h.src if self.daemon == "src" else h.dst


def _begin(lab: Lab, domain: str = BETA) -> str:
    mid = new_mid()
    lab.unary(lab.a.src, "MigrationSourceService", "Begin", pb.BeginRequest(
        header=pb.PhaseHeader(migration_id=mid, flags=OFFLINE), domain=domain))
    return mid


def _prepared(lab: Lab) -> str:
    mid = new_mid()
    lab.unary(lab.b.dst, "MigrationDestinationService", "Prepare", pb.PrepareRequest(
        header=pb.PhaseHeader(migration_id=mid, flags=OFFLINE_P2P, cookie=lab.alpha_cookie()),
        domain_xml=lab.xml[ALPHA]))
    return mid


def _prepare(flags: int) -> Callable[[Lab, str], Message]:
    return lambda lab, _: pb.PrepareRequest(
        header=pb.PhaseHeader(migration_id=new_mid(), flags=flags, cookie=lab.alpha_cookie(),
                              deadline_unix_ms=int((time.time() + 60) * 1000)),
        domain_xml=lab.xml[ALPHA],
        params=pb.MigrationParams(dest_name=ALPHA),
    )


def _dom(cls: type[Message], **kw: Any) -> Callable[[Lab, str], Message]:
    return lambda lab, _: cls(domain=BETA, **kw)


DS, SS, DD = "DomainService", "MigrationSourceService", "MigrationDestinationService"

CATALOG: list[Rpc] = [
    Rpc(DS, "Define", pb.DefineRequest, "A", "src",
        lambda lab, _: pb.DefineRequest(xml=lab.new_xml)),
    Rpc(DS, "Undefine", pb.UndefineRequest, "A", "src", _dom(pb.UndefineRequest)),
    Rpc(DS, "List", pb.ListRequest, "A", "src", lambda lab, _: pb.ListRequest(all=True)),
    Rpc(DS, "GetState", pb.DomainRequest, "A", "src", _dom(pb.DomainRequest)),
    Rpc(DS, "GetInfo", pb.DomainRequest, "A", "src", _dom(pb.DomainRequest)),
    Rpc(DS, "DumpXML", pb.DumpXMLRequest, "A", "src", _dom(pb.DumpXMLRequest, inactive=True)),
    Rpc(DS, "Migrate", pb.MigrateRequest, "A", "src",
        lambda lab, _: pb.MigrateRequest(domain=ALPHA, dest_uri=lab.b.dst, flags=OFFLINE_P2P,
                                      migration_id=new_mid())),
    Rpc(DS, "Start", pb.DomainRequest, "A", "src", _dom(pb.DomainRequest)),
    Rpc(DS, "Destroy", pb.DomainRequest, "A", "src", _dom(pb.DomainRequest)),
    Rpc(DS, "Shutdown", pb.DomainRequest, "A", "src", _dom(pb.DomainRequest)),
    Rpc(DS, "Suspend", pb.DomainRequest, "A", "src", _dom(pb.DomainRequest)),
    Rpc(DS, "Resume", pb.DomainRequest, "A", "src", _dom(pb.DomainRequest)),
    Rpc(DS, "GetJobInfo", pb.JobInfoRequest, "A", "src", _dom(pb.JobInfoRequest, completed=True)),
    Rpc(DS, "AbortJob", pb.AbortJobRequest, "A", "src", _dom(pb.AbortJobRequest)),
    Rpc(DS, "SetMaxSpeed", pb.SpeedRequest, "A", "src", _dom(pb.SpeedRequest, bandwidth_mib=100)),
    Rpc(DS, "GetMaxSpeed", pb.DomainRequest, "A", "src", _dom(pb.DomainRequest)),
    Rpc(DS, "SetMaxDowntime", pb.DowntimeRequest, "A", "src",
        _dom(pb.DowntimeRequest, downtime_ms=300)),
    Rpc(SS, "Begin", pb.BeginRequest, "A", "src",
        lambda lab, _: pb.BeginRequest(header=pb.PhaseHeader(migration_id=new_mid(), flags=OFFLINE),
                                    domain=BETA)),
    Rpc(SS, "Perform", pb.PerformRequest, "A", "src",
        lambda lab, mid: pb.PerformRequest(
            header=pb.PhaseHeader(migration_id=mid, flags=OFFLINE), domain=BETA,
            params=pb.MigrationParams(migrate_uri="tcp:127.0.0.7:1")), _begin),
    Rpc(SS, "Confirm", pb.ConfirmRequest, "A", "src",
        lambda lab, mid: pb.ConfirmRequest(
            header=pb.PhaseHeader(migration_id=mid, flags=OFFLINE), domain=BETA,
            cancelled=True), _begin),
    Rpc(DD, "GetCapabilities", pb.CapabilitiesRequest, "B", "dst",
        lambda lab, _: pb.CapabilitiesRequest()),
    Rpc(DD, "Prepare", pb.PrepareRequest, "B", "dst", _prepare(OFFLINE_P2P), variant="offline"),
    Rpc(DD, "Prepare", pb.PrepareRequest, "B", "dst", _prepare(LIVE_P2P), variant="live"),
    Rpc(DD, "PrepareTunnel", pb.PrepareRequest, "B", "dst", _prepare(TUNNEL_P2P)),
    Rpc(DD, "Finish", pb.FinishRequest, "B", "dst",
        lambda lab, mid: pb.FinishRequest(
            header=pb.PhaseHeader(migration_id=mid, flags=OFFLINE_P2P),
            dest_name=ALPHA), _prepared),
]

RESPONSES: dict[tuple[str, str], Any] = {}
for _svc in pb.DESCRIPTOR.services_by_name.values():
    for _m in _svc.methods:
        RESPONSES[(_svc.name, _m.name)] = getattr(pb, _m.output_type.name)

UNARY_METHODS = [
    (svc.name, m.name)
    for svc in pb.DESCRIPTOR.services_by_name.values()
    for m in svc.methods
    # a server stream (Events) never ends by itself: not a unary case
    if not m.client_streaming and not m.server_streaming
]


def leaf_paths(desc: pbd.Descriptor, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for f in desc.fields:
        if f.type == pbd.FieldDescriptor.TYPE_MESSAGE:
            yield from leaf_paths(f.message_type, (*prefix, f.name))
        else:
            yield (*prefix, f.name)


# ---------------------------------------------------------------------------------------
# Hostile values, by field type (and by field name where the field carries XML, a cookie
# or an address)

PATHLIKE = [
    "/", ".", "..", "../..", "../../../../etc/passwd", "/etc/passwd", "domains/x", "a/b",
    "..\\..\\x", "~root", "x\x00y", "\x00", " ", "\n", "-rf", "*", "%s%n%x", "${HOME}",
    "jobs/../domains", "host.json", "locks/store.lock", "\u202e", "\ufeff", "\U0001f600",
    "CON", "nul", "a" * 129, "A" * 1025,
]
HUGE_SIZES = [1_025, 70_000, 1024 * 1024 + 1, 4 * 1024 * 1024 + 1]


def _text_values() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=40),
        st.text(st.characters(codec="utf-8"), min_size=1, max_size=400),
        st.sampled_from(PATHLIKE),
        st.uuids().map(str),
        st.builds(lambda c, n: c * n, st.sampled_from(["x", "/", "\x00", "\u00e9", "<"]),
                  st.sampled_from(HUGE_SIZES)),
        st.from_regex(r"[A-Za-z0-9._:-]{1,140}", fullmatch=True),
    )


def _xml_values(seed: str) -> st.SearchStrategy[str]:
    raw = mutated([seed.encode()])
    return st.one_of(
        raw.map(lambda b: b.decode("utf-8", "replace")),
        st.sampled_from(FRAGMENTS).map(lambda b: b.decode("utf-8", "replace") + seed),
        _text_values(),
    )


def _address_values(lab: Lab, grpc_target: bool) -> st.SearchStrategy[str]:
    """Only loopback addresses (IP literals: nothing for a resolver), local sockets, or
    strings that are refused before any lookup. dest_uri is a gRPC target, where anything
    not an IP literal would go to DNS: it gets only these."""
    values = st.one_of(
        st.builds(lambda n, p: f"127.0.0.{n}:{p}", st.integers(1, 254), st.integers(0, 65535)),
        st.builds(lambda p: f"[::1]:{p}", st.integers(0, 65535)),
        st.sampled_from([
            lab.a.dst, lab.a.src, lab.b.src, lab.b.dst, "", "127.0.0.1:-1", "127.0.0.1:99999",
            "unix:/nonexistent/fuzz.sock", "unix-abstract:fuzz-nothing", "ipv4:127.0.0.1:1",
            "ipv6:[::1]:1", "127.0.0.1",
        ]),
    )
    if grpc_target:
        return values
    return st.one_of(
        values,
        st.builds(lambda p: f"tcp:127.0.0.1:{p}", st.integers(0, 65535)),
        st.sampled_from(["tcp:", "tcp:[::1]", "rdma:127.0.0.1:1", "unix:/x", "tcp:127.0.0.1"]),
    )


def value_strategy(lab: Lab, field: pbd.FieldDescriptor, current: Any) -> st.SearchStrategy[Any]:
    name = field.name
    t = field.type
    if name in ("dest_uri", "migrate_uri", "listen_address"):
        return _address_values(lab, grpc_target=name == "dest_uri")
    if t == pbd.FieldDescriptor.TYPE_STRING:
        if name in ("xml", "domain_xml", "dest_xml", "persist_xml"):
            return _xml_values(current or lab.xml[ALPHA])
        return _text_values()
    if t == pbd.FieldDescriptor.TYPE_BYTES:
        seed = current or lab.alpha_cookie()
        return st.one_of(
            mutated([seed]),
            st.binary(max_size=300),
            st.sampled_from(FRAGMENTS).map(lambda f: f + seed),
            st.builds(lambda n: b"\xff" * n, st.sampled_from(HUGE_SIZES)),
        )
    if t == pbd.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    bits = 32 if t in (pbd.FieldDescriptor.TYPE_INT32, pbd.FieldDescriptor.TYPE_UINT32) else 64
    if t in (pbd.FieldDescriptor.TYPE_UINT64, pbd.FieldDescriptor.TYPE_UINT32):
        lo, hi = 0, 2**bits - 1
    else:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return st.one_of(
        st.integers(lo, hi),
        st.sampled_from([lo, hi, 0, 1, max(lo, -1), hi // 2 + 1]),
        st.integers(0, bits - 1).map(lambda k: min(max((int(current or 0) ^ (1 << k)), lo), hi)),
    )


def _set(msg: Message, path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        msg = getattr(msg, part)
    items = getattr(msg, path[-1])
    if not isinstance(items, Message) and hasattr(items, "append"):
        # a repeated field is set by its items (a container, not assignable)
        del items[:]
        items.append(value)
        return
    setattr(msg, path[-1], value)


def _get(msg: Message, path: tuple[str, ...]) -> Any:
    for part in path:
        msg = getattr(msg, part)
    return msg


def _field(desc: pbd.Descriptor, path: tuple[str, ...]) -> pbd.FieldDescriptor:
    for part in path[:-1]:
        desc = desc.fields_by_name[part].message_type
    return desc.fields_by_name[path[-1]]


# ---------------------------------------------------------------------------------------
# Checking one answer


def check_status(err: grpc.RpcError, what: str) -> None:
    code = err.code()
    details = err.details() or ""
    md = dict((k, v) for k, v in (err.trailing_metadata() or ()))
    if code == grpc.StatusCode.UNKNOWN:
        raise Crash(f"{what}: UNKNOWN (an unhandled exception): {details[:500]}")
    if code == grpc.StatusCode.INTERNAL and ERROR_CLASS_KEY not in md:
        raise Crash(f"{what}: INTERNAL without an error class: {details[:500]}")
    if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE) and (
        ERROR_CLASS_KEY not in md  # with a class: the daemon reports its peer unreachable
    ):
        raise Crash(f"{what}: {code.name} (daemon hung or gone): {details[:500]}")
    if "metadata size exceeds" in details or details.startswith("Stream removed"):
        raise Crash(f"{what}: the error was lost (status message too large): {details[:300]}")
    if not details.strip():
        raise Crash(f"{what}: {code.name} with an empty message")


def field_case(lab: Lab, rpc: Rpc, data: st.DataObject) -> str:
    """One fuzz case for one RPC; returns the status code name. Raises Crash."""
    # Draw everything first: hypothesis may end a case inside a draw, and a setup already
    # made (a Begin, a Prepare) would then be left behind.
    template = rpc.base(lab, "fz-template")
    paths = list(leaf_paths(rpc.request.DESCRIPTOR))
    changes: list[tuple[tuple[str, ...], Any]] = []
    if paths:
        chosen = data.draw(st.lists(st.sampled_from(paths), min_size=1, max_size=3, unique=True))
        for path in chosen:
            field = _field(rpc.request.DESCRIPTOR, path)
            value = data.draw(value_strategy(lab, field, _get(template, path)),
                              label=".".join(path))
            changes.append((path, value))
    mid = rpc.setup(lab) if rpc.setup else ""
    request = rpc.base(lab, mid)
    for path, value in changes:
        _set(request, path, value)
    # Perform, Confirm and Finish end the job they address whatever their outcome (libvirt
    # ends the migration job in the last phase of each side, and a failed managed Perform
    # restores the source): the setup's record may go even when the request is refused.
    ends = {f"{rpc.host}/jobs/{mid}.json"} if mid else set()
    return send_and_check(lab, rpc.address(lab), rpc.service, rpc.method, request, rpc.name,
                          may_vanish=ends)


def send_and_check(lab: Lab, addr: str, service: str, method: str, request: Message | bytes,
                   what: str, may_vanish: Collection[str] = ()) -> str:
    before = lab.snapshot()
    raw = isinstance(request, bytes)
    call = lab.channels[addr].unary_unary(
        f"/vmmigrate.v1.{service}/{method}",
        request_serializer=None if raw else (lambda m: m.SerializeToString()),
        response_deserializer=None,
    )
    lab.inputs += 1
    try:
        try:
            call(request, timeout=RPC_TIMEOUT)
            code = "OK"
        except grpc.RpcError as err:
            lab.alive()
            check_status(err, what)
            code = err.code().name
            lab.settle(before, f"{what} refused ({code}: {(err.details() or '')[:200]})",
                       may_vanish)
        lab.alive()
    finally:
        lab.recover()  # also after a crash, so that the next input starts from the baseline
    lab.settle(lab.baseline, f"{what} answered {code}, then reconcile")
    return code


# ---------------------------------------------------------------------------------------
# Raw bytes as the serialized request


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


@st.composite
def raw_payloads(draw: st.DrawFn, valid: bytes) -> bytes:
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return draw(st.binary(max_size=400))
    if kind == 1:  # a valid message with bytes flipped / cut
        data = bytearray(valid)
        for _ in range(draw(st.integers(1, 4))):
            if data:
                i = draw(st.integers(0, len(data) - 1))
                data[i] = draw(st.integers(0, 255))
        return bytes(data[: draw(st.integers(0, len(data)))]) if draw(st.booleans()) else bytes(data)
    if kind == 2:  # a length-delimited field (string, bytes or message) that is not UTF-8
        field = draw(st.integers(1, 12))
        payload = draw(st.sampled_from([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"caf\xe9",
                                        b"\x80" * 3, b"\x00\xff"]))
        return valid + _varint(field << 3 | 2) + _varint(len(payload)) + payload
    if kind == 3:  # unknown fields, wrong wire types, absurd lengths
        field = draw(st.integers(1, 2**29 - 1))
        wire = draw(st.integers(0, 7))
        tail = draw(st.sampled_from([b"", b"\x01", _varint(2**63), _varint(2**35) + b"x",
                                     b"\xff" * 11]))
        return valid + _varint(field << 3 | wire) + tail
    # deeply nested messages (field 1 inside field 1 ...) or unbalanced groups
    depth = draw(st.integers(50, 2000))
    if draw(st.booleans()):
        return b"\x1b" * depth + b"\x1c" * draw(st.integers(0, depth))
    inner = b""
    for _ in range(min(depth, 300)):
        inner = b"\x0a" + _varint(len(inner)) + inner
    return inner


def raw_case(lab: Lab, data: st.DataObject) -> str:
    service, method = data.draw(st.sampled_from(UNARY_METHODS), label="method")
    valid = b""
    for rpc in CATALOG:
        if (rpc.service, rpc.method) == (service, method) and rpc.method not in (
                "Perform", "Confirm", "Finish"):
            valid = rpc.base(lab, "").SerializeToString()
            break
    payload = data.draw(raw_payloads(valid), label="payload")
    daemon = "dst" if service == DD else "src"
    host = lab.b if daemon == "dst" else lab.a
    addr = host.dst if daemon == "dst" else host.src
    return send_and_check(lab, addr, service, method, payload, f"raw {service}.{method}")


# ---------------------------------------------------------------------------------------
# The tunnel stream


def stream_and_check(lab: Lab, what: str, consume: Callable[[], None]) -> str:
    """Run one streaming call (``consume``); the answer must be clean and the state as
    before it, then as the baseline once the lab has reconciled."""
    before = lab.snapshot()
    lab.inputs += 1
    code = "OK"
    try:
        try:
            consume()
        except grpc.RpcError as err:
            lab.alive()
            check_status(err, what)
            code = err.code().name
        lab.alive()
        lab.settle(before, f"{what} answered {code}")
    finally:
        lab.recover()
    lab.settle(lab.baseline, f"{what} answered {code}, then reconcile")
    return code


def tunnel_case(lab: Lab, data: st.DataObject) -> str:
    """Arbitrary raw messages on TunnelBytes.Carry, with arbitrary metadata (the migration
    id, and a stray header such as the credit request of an encoding that is gone);
    sometimes addressed to a real tunnelled incoming migration (PrepareTunnel first), so
    that garbage reaches an incoming emulator. The stream ends with a clean status, every
    message back but the final EOF is a well-formed frame, and once the migration is
    cancelled nothing is left."""
    messages = data.draw(
        st.lists(st.one_of(st.binary(max_size=200), st.just(b"\x00" * 70_000)), max_size=3),
        label="messages",
    )
    stray = data.draw(
        st.sampled_from([None, "vmmigrate-tunnel-credit", "vmmigrate-migration-id-bin", "x"]),
        label="stray header",
    )
    stray_value = data.draw(st.sampled_from(["1", "0", "", "yes", "1" * 300]), label="value")
    to_job = data.draw(st.booleans(), label="to a prepared migration")
    # gRPC itself refuses request metadata over 16 KiB (RESOURCE_EXHAUSTED, before any
    # daemon code runs), so the id is kept below that: what is tried is the daemon's answer
    mid = data.draw(_text_values().filter(lambda t: len(t) <= 4096), label="migration id")
    if to_job:
        mid = new_mid()
        req = _prepare(TUNNEL_P2P)(lab, "")
        req.header.migration_id = mid
        lab.unary(lab.b.dst, DD, "PrepareTunnel", req)
    metadata: list[tuple[str, str | bytes]] = (
        [(tunnelwire.MIGRATION_ID_KEY, mid)] if mid.isascii() and mid.isprintable() else []
    )
    if stray is not None:
        metadata.append((stray, stray_value.encode() if stray.endswith("-bin") else stray_value))
    call = lab.channels[lab.b.dst].stream_stream(tunnelwire.METHOD)

    def consume() -> None:
        for msg in call(iter(messages), metadata=metadata, timeout=RPC_TIMEOUT):
            if msg:
                try:
                    tunnelwire.parse_frame(msg)
                except ValueError as exc:
                    raise Crash(f"TunnelBytes: a malformed frame back: {exc}") from exc

    return stream_and_check(lab, "TunnelBytes", consume)
