"""The top-level docker-compose.yml, run for real: a two-host cluster and a client container.

Everything runs inside a lab (lab.py): a dockerd of its own in a network namespace with only
loopback, images built with no registry (a debootstrap base, the project from host-made
wheels). The cluster is the default compose path, mutual TLS: the init service makes the CA
and every certificate with `migctl pki`, each host serves with its own, and the client holds
an admin and a readonly client certificate. From the client container: offline migrations
(peer-to-peer, and client-driven through srcd's relay to hostb's dstd), live ones (direct
and tunnelled), a readonly client refused a migration and plaintext refused, then a live
migration during which the destination container is killed and started again, after which
the domain must be on exactly one host, with the same definition, and migratable again.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from container import lab as labmod
from helpers.hosts import sample_domain_xml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

# The client's certificates, where docker-compose.yml mounts them (admin is $MIGCTL_TLS_DIR)
ADMIN_TLS = "/etc/vmmigrate/clients/admin"
READONLY_TLS = "/etc/vmmigrate/clients/readonly"

TIMINGS: dict[str, float] = {}


def _prerequisites() -> str | None:
    """Why the test cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespace, dockerd)"
    if labmod.missing_tools():
        try:
            t = time.monotonic()
            labmod.install_docker()
            TIMINGS["apt-get install"] = time.monotonic() - t
        except (subprocess.CalledProcessError, FileNotFoundError) as e:
            return f"Docker cannot be installed: {e}"
        if missing := labmod.missing_tools():
            return f"still missing after apt-get: {', '.join(missing)}"
    return None


class Cluster:
    def __init__(self, lab: labmod.Lab) -> None:
        self.lab = lab

    def compose(
        self, *args: str, check: bool = True, input: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        return self.lab.compose(labmod.REPO, *args, check=check, input=input)

    def migctl(
        self,
        *args: str,
        host: str = "hosta",
        check: bool = True,
        input: bytes | None = None,
        tls_dir: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """migctl in the client container; TLS with the admin certificate unless tls_dir."""
        tls = ["--tls-dir", tls_dir] if tls_dir else []
        cmd = ["exec", "-T", "client", "migctl", "-c", f"{host}:7301", *tls, *args]
        return self.compose(*cmd, check=check, input=input)

    def sha256(self, service: str, *paths: str) -> str:
        script = f"sha256sum {' '.join(shlex.quote(p) for p in paths)}"
        return self.compose("exec", "-T", service, "sh", "-c", script).stdout

    def define(self, name: str, host: str = "hosta", memory_mib: int = 16) -> None:
        xml = sample_domain_xml(name, memory_mib=memory_mib).encode()
        self.migctl("define", "/dev/stdin", host=host, input=xml)

    def names(self, host: str) -> set[str]:
        return set(self.migctl("list", "--all", "--name", host=host).stdout.split())

    def state(self, name: str, host: str) -> str:
        return self.migctl("domstate", name, host=host).stdout.strip()

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def wait_healthy(self, service: str, timeout: float = 120.0) -> None:
        cid = self.container(service)
        deadline = time.monotonic() + timeout
        status = ""
        while time.monotonic() < deadline:
            fmt = "{{.State.Health.Status}}"
            status = self.lab.docker("inspect", "-f", fmt, cid).stdout.strip()
            if status == "healthy":
                return
            time.sleep(0.5)
        raise AssertionError(f"{service} not healthy after {timeout}s: {status}")


def _timed(label: str) -> _Timer:
    return _Timer(label)


class _Timer:
    def __init__(self, label: str) -> None:
        self.label = label

    def __enter__(self) -> None:
        self.t = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        TIMINGS[self.label] = time.monotonic() - self.t


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if reason := _prerequisites():
        pytest.skip(reason)
    lab = labmod.Lab()
    c = Cluster(lab)
    try:
        with _timed("dockerd start"):
            lab.start()
        with _timed("base image (debootstrap or cache, import)"):
            lab.import_base()
        with _timed("project image (pip wheel, docker build)"):
            lab.build_project()
        with _timed("compose up (until healthy)"):
            c.compose("up", "-d")
        yield c
    finally:
        try:
            if lab.proc is not None:
                with _timed("compose down -v"):
                    c.compose("down", "-v", "-t", "5", check=False)
        finally:
            with _timed("dockerd stop and cleanup"):
                lab.stop()
            print("\ncontainer lab timings (s):")
            for label, seconds in TIMINGS.items():
                print(f"  {label:52} {seconds:7.1f}")


def test_offline_p2p_migration(cluster: Cluster) -> None:
    with _timed("scenario: offline p2p"):
        cluster.define("off1")
        xml_a = cluster.migctl("dumpxml", "off1").stdout
        cluster.migctl(
            "migrate", "--offline", "--persistent", "--p2p", "--undefinesource", "off1",
            "hostb:7302",
        )  # fmt: skip
        assert "off1" in cluster.names("hostb")
        assert "off1" not in cluster.names("hosta")
        assert cluster.migctl("dumpxml", "off1", host="hostb").stdout == xml_a


def test_offline_client_driven_migration(cluster: Cluster) -> None:
    """migctl in the client container runs the phases itself; hostb's dstd takes host
    certificates only, so its phases go through hosta's srcd relay."""
    with _timed("scenario: offline client-driven"):
        cluster.define("off2")
        cluster.migctl("migrate", "--offline", "--persistent", "off2", "hostb:7302")
        # without --undefinesource the source keeps its definition, as libvirt's does
        assert "off2" in cluster.names("hostb")
        assert "off2" in cluster.names("hosta")


def test_live_tunnelled_migration(cluster: Cluster) -> None:
    """The hypervisor stream rides srcd's gRPC connection to hostb's dstd."""
    with _timed("scenario: live p2p tunnelled"):
        cluster.define("tun1", memory_mib=32)
        cluster.migctl("start", "tun1")
        cluster.migctl(
            "migrate", "--live", "--p2p", "--tunnelled", "--persistent", "--undefinesource",
            "tun1", "hostb:7302",
        )  # fmt: skip
        assert cluster.state("tun1", "hostb") == "running"
        assert "tun1" not in cluster.names("hosta")


def test_live_p2p_migration(cluster: Cluster) -> None:
    with _timed("scenario: live p2p (simvm)"):
        cluster.define("live1", memory_mib=32)
        cluster.migctl("start", "live1")
        cluster.migctl(
            "migrate", "--live", "--persistent", "--p2p", "--undefinesource", "live1",
            "hostb:7302",
        )  # fmt: skip
        assert cluster.state("live1", "hostb") == "running"
        assert "live1" not in cluster.names("hosta")


def test_readonly_client_refused_migration(cluster: Cluster) -> None:
    """The readonly certificate may look (list, dumpxml), not migrate: PERMISSION_DENIED
    before anything moves, both hosts as they were."""
    with _timed("scenario: readonly refused"):
        cluster.define("ro1")
        xml_a = cluster.migctl("dumpxml", "ro1").stdout
        names = cluster.migctl("list", "--all", "--name", tls_dir=READONLY_TLS).stdout.split()
        assert "ro1" in names
        for extra in ([], ["--p2p"]):
            res = cluster.migctl(
                "migrate", "--offline", "--persistent", *extra, "--undefinesource", "ro1",
                "hostb:7302", tls_dir=READONLY_TLS, check=False,
            )  # fmt: skip
            assert res.returncode != 0, res.stdout
            forbidden = "error: operation forbidden: read-only access prevents"
            assert forbidden in res.stderr, res.stderr
        print(f"\nreadonly migctl migrate: {res.stderr.strip()}")
        assert "ro1" in cluster.names("hosta")
        assert "ro1" not in cluster.names("hostb")
        assert cluster.migctl("dumpxml", "ro1").stdout == xml_a


def test_plaintext_refused(cluster: Cluster) -> None:
    """No plaintext path into the cluster: a client asking for it is not served."""
    res = cluster.migctl("--insecure", "list", "--all", check=False)
    assert res.returncode != 0, res.stdout
    assert res.stderr.startswith("error: "), res.stderr
    print(f"\nplaintext migctl list: {res.stderr.strip()}")


def test_readme_run_example(cluster: Cluster) -> None:
    """The README's way in: one-off client containers (`docker-compose run`), stdin and all,
    with the client service's certificates."""
    xml = sample_domain_xml("run1", memory_mib=16).encode()
    run = ["run", "--rm", "-T", "client", "migctl"]
    cluster.compose(*run, "define", "/dev/stdin", input=xml)
    cluster.compose(*run, "migrate", "--offline", "--persistent", "--p2p", "run1", "hostb:7302")
    assert "run1" in cluster.compose(*run, "-c", "hostb:7301", "list", "--all").stdout


def test_pki_init_is_idempotent(cluster: Cluster) -> None:
    """Running the init service again (as every `up` does) keeps the material in use."""
    files = [f"{d}/{n}" for d in (ADMIN_TLS, READONLY_TLS) for n in ("ca.pem", "cert.pem")]
    before = cluster.sha256("client", *files)
    out = cluster.compose("run", "--rm", "pki").stdout
    print(f"\npki service, second run:\n{out.strip()}")
    assert "issued" not in out.lower() and "written" not in out.lower(), out
    assert cluster.sha256("client", *files) == before
    cluster.migctl("list", "--all")  # the hosts still accept the client


def test_destination_killed_mid_migration(cluster: Cluster) -> None:
    with _timed("scenario: hostb killed mid-migration"):
        _kill_destination_mid_migration(cluster)


def _kill_destination_mid_migration(cluster: Cluster) -> None:
    cluster.define("kill1", memory_mib=64)
    cluster.migctl("start", "kill1")
    xml_before = cluster.migctl("dumpxml", "--inactive", "kill1").stdout
    # 64 MiB at 2 MiB/s: half a minute in flight, time enough to kill the destination
    cmd = [*cluster.lab.compose_cmd(labmod.REPO), "exec", "-T", "client", "migctl"]
    cmd += ["-c", "hosta:7301", "migrate", "--live", "--persistent", "--p2p", "--undefinesource"]
    cmd += ["--bandwidth", "2", "kill1", "hostb:7302"]
    proc = subprocess.Popen(
        cmd, env=cluster.lab.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_job(cluster, "kill1")
    hostb = cluster.container("hostb")
    cluster.lab.docker("kill", hostb)
    killed = time.monotonic()
    _, err = proc.communicate(timeout=300)
    TIMINGS["hostb killed: from the kill to the client's error"] = time.monotonic() - killed
    print(f"\nmigctl after the kill: {err.strip()}")
    assert proc.returncode != 0, "the migration succeeded though its destination was killed"
    assert err.startswith("error: "), err
    cluster.lab.docker("start", hostb)
    cluster.wait_healthy("hostb")
    # one owner, the same definition, still running where it was (hostb is back on its
    # own certificate, from its read-only volume)
    assert "kill1" in cluster.names("hosta")
    assert "kill1" not in cluster.names("hostb")
    assert cluster.state("kill1", "hosta") == "running"
    assert cluster.migctl("dumpxml", "--inactive", "kill1").stdout == xml_before
    # and migratable again, to the restarted host
    cluster.migctl(
        "migrate", "--live", "--persistent", "--p2p", "--undefinesource", "kill1", "hostb:7302"
    )
    assert cluster.state("kill1", "hostb") == "running"
    assert "kill1" not in cluster.names("hosta")


def _wait_for_job(cluster: Cluster, name: str, timeout: float = 60.0) -> None:
    """Until the source reports the migration moving memory."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = cluster.migctl("domjobinfo", name, check=False).stdout
        rows = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        processed = rows.get("Data processed", "0 MiB").split()[0]
        if rows.get("Job type", "").strip() == "Unbounded" and float(processed) > 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"no migration job seen for {name}")


def test_containers_reach_nothing_off_the_machine(cluster: Cluster) -> None:
    """The lab's namespace has no route out: a connect to a TEST-NET address fails at once
    (ENETUNREACH), not after a timeout, so no packet can have left."""
    probe = (
        "import errno, socket\n"
        "try:\n"
        "    socket.create_connection(('192.0.2.1', 80), timeout=5)\n"
        "except OSError as e:\n"
        "    print(errno.errorcode.get(e.errno, e))\n"
    )
    for service in ("client", "hosta"):
        out = cluster.compose("exec", "-T", service, "python3", "-c", probe).stdout
        assert out.strip() == "ENETUNREACH", (service, out)


def test_compose_file_is_v1_compatible() -> None:
    """No top-level name: (docker-compose 1.29 rejects it), a 2.x/3.x file format."""
    text = Path(labmod.REPO / "docker-compose.yml").read_text()
    assert not any(line.startswith("name:") for line in text.splitlines())
    assert 'version: "2.4"' in text


def test_default_compose_path_has_no_plaintext() -> None:
    """TLS by default: nothing in the compose file or the image's scripts asks for
    plaintext (--insecure stays something an operator adds by hand)."""
    for path in ("docker-compose.yml", "docker/entrypoint.sh", "docker/pki-init.sh"):
        text = (labmod.REPO / path).read_text()
        code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
        assert "--insecure" not in code, path
