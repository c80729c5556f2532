"""docs/GUESTS.md against qemuargv's allowlists: the document says what a domain XML may
contain; the code's allowlists are the truth. A name added to (or dropped from) an allowlist
without the document following fails here, and so does a document listing what the code
does not accept."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from vmmigrate.common import qemuargv

DOC = Path(__file__).resolve().parents[2] / "docs" / "GUESTS.md"
TEXT = DOC.read_text()
ELEMENT = re.compile(r"`<([A-Za-z_:-]+)>`")


def section(heading: str) -> str:
    """The text under ``heading`` (a whole heading line), up to the next heading of its level
    or above."""
    lines = TEXT.splitlines()
    start = lines.index(heading)
    level = len(heading) - len(heading.lstrip("#"))
    out = []
    for line in lines[start + 1 :]:
        hashes = len(line) - len(line.lstrip("#"))
        if line.startswith("#") and hashes <= level:
            break
        out.append(line)
    return "\n".join(out)


def table_elements(text: str) -> set[str]:
    """The elements named in the first column of the section's first table."""
    names = set()
    for line in text.splitlines():
        if line.startswith("| `<"):
            first = line.split("|")[1]
            names.update(ELEMENT.findall(first))
    return names


def children(text: str) -> set[str]:
    """The elements of the section's "Children:" paragraph, up to its first parenthesis."""
    para = text[text.index("Children:") :].split("\n\n", maxsplit=1)[0]
    return set(ELEMENT.findall(para.split("(")[0]))


def test_the_top_level_table_is_the_allowlist() -> None:
    listed = table_elements(section("### Top-level elements"))
    assert listed == qemuargv._MAPPED_TOP | qemuargv._HARMLESS_TOP


def test_the_device_table_is_the_allowlist() -> None:
    assert table_elements(section("### Devices")) == qemuargv._DEVICES


@pytest.mark.parametrize(
    ("heading", "allowed"),
    [
        ("### `<os>`", qemuargv._OS_CHILDREN),
        ("### `<features>`", qemuargv._FEATURES),
        ("### `<cpu>`", qemuargv._CPU_CHILDREN),
    ],
)
def test_children_of_os_features_and_cpu(heading: str, allowed: frozenset[str]) -> None:
    assert children(section(heading)) == allowed


def device_headings() -> dict[str, list[str]]:
    """Each "#### `<tag>`[, `<tag>`...]" heading and the devices it covers."""
    return {
        line: ELEMENT.findall(line) for line in TEXT.splitlines() if line.startswith("#### ")
    }


def test_every_device_with_children_has_its_section() -> None:
    covered = {tag for tags in device_headings().values() for tag in tags}
    assert covered == qemuargv._DEVICES - {"emulator"}


@pytest.mark.parametrize("heading", sorted(device_headings()))
def test_each_device_section_lists_exactly_its_children(heading: str) -> None:
    tags = device_headings()[heading]
    listed = children(section(heading))
    each = [qemuargv._DEVICE_CHILDREN[t] | qemuargv._COMMON_CHILDREN for t in tags]
    assert all(allowed <= listed for allowed in each), (heading, listed)
    assert listed <= frozenset().union(*each), (heading, listed)


def code_tokens() -> set[str]:
    """Every word written in backticks in the document (split at what is not part of a
    name or value)."""
    out: set[str] = set()
    for span in re.findall(r"`([^`]+)`", TEXT):
        out.update(t for t in re.split(r"[^A-Za-z0-9_.-]+", span) if t)
    return out


VALUES = {
    "interface models and their devices": [*qemuargv._NIC_MODELS, *qemuargv._NIC_MODELS.values()],
    "USB controller models and devices": [*qemuargv._USB_MODELS, *qemuargv._USB_MODELS.values()],
    "PCI controller models and devices": [
        *qemuargv._PCI_CONTROLLERS,
        *qemuargv._PCI_CONTROLLERS.values(),
    ],
    "controller types": list(qemuargv._CONTROLLERS),
    "video models and devices": [*qemuargv._VIDEO, *qemuargv._VIDEO.values()],
    "input devices": [
        *{part for key in qemuargv._INPUT_DEVICES for part in key},
        *qemuargv._INPUT_DEVICES.values(),
    ],
    "cache modes": list(qemuargv._CACHE),
    "disk driver attributes": list(qemuargv._DRIVER_ATTRS),
    "drive buses": list(qemuargv._DRIVE_BUSES),
    "watchdog actions": list(qemuargv._WATCHDOG_ACTIONS),
    "boot devices and their letters": [*qemuargv._BOOT_DEVS, *qemuargv._BOOT_DEVS.values()],
    "TCG CPU models": list(qemuargv.TCG_CPU_MODELS),
    "architectures": list(qemuargv._ARCHES),
    # the attributes each checked element may carry, and their values and mappings
    "vcpu attributes": list(qemuargv._VCPU_ATTRS),
    "on_crash actions": list(qemuargv._ON_CRASH),
    "CPU attributes and topology": [*qemuargv._CPU_ATTRS, *qemuargv._CPU_CHECKS, *qemuargv._TOPOLOGY],
    "timers, their attributes and rtc tracks": [
        *qemuargv._TIMER_ATTRS,
        *{a for attrs in qemuargv._TIMER_ATTRS.values() for a in attrs},
        *qemuargv._RTC_TRACK,
        *qemuargv._RTC_TRACK.values(),
    ],
    "disk target attributes": list(qemuargv._TARGET_ATTRS),
    "controller attributes and drivers": [
        *{a for attrs in qemuargv._CONTROLLER_ATTRS.values() for a in attrs},
        *qemuargv._SCSI_DRIVER,
        *qemuargv._SCSI_DRIVER.values(),
        *{n for names in qemuargv._PCI_MODEL_NAMES.values() for n in names},
        *{a for attrs in qemuargv._PCI_TARGET_ATTRS.values() for a in attrs},
    ],
    "VNC attributes and share policies": [*qemuargv._VNC_ATTRS, *qemuargv._VNC_SHARE],
    "video model attributes": [a for attrs in qemuargv._VIDEO_ATTRS.values() for a in attrs],
    "memballoon attributes": list(qemuargv._BALLOON_ATTRS),
}


@pytest.mark.parametrize("what", sorted(VALUES))
def test_every_accepted_value_is_named(what: str) -> None:
    missing = sorted(set(VALUES[what]) - code_tokens())
    assert not missing, f"{what} missing from docs/GUESTS.md: {missing}"


def test_the_machine_types_named_are_the_ones_accepted() -> None:
    named = {"pc", "q35", "pc-i440fx-7.2", "pc-q35-7.2", "pc-q35-7.2.0"}
    assert all(qemuargv._MACHINE.match(m) for m in named)
    assert {"`pc`", "`q35`", "`pc-i440fx-X.Y`", "`pc-q35-X.Y[.Z]`"} <= set(
        re.findall(r"`[^`]+`", section("### `<os>`"))
    )


def test_the_readme_and_the_architecture_link_it() -> None:
    root = DOC.parents[1]
    assert "docs/GUESTS.md" in (root / "README.md").read_text()
    assert "GUESTS.md" in (root / "docs" / "ARCHITECTURE.md").read_text()
