"""``migctl help [COMMAND|GROUP]``: virsh's help layout, built from migctl's own parser.

Without an argument, the commands grouped as ``virsh help`` groups them (each group has a
keyword: ``migctl help monitor`` lists one group). With a command, its page in virsh's
NAME / SYNOPSIS / DESCRIPTION / OPTIONS layout. Everything is read from the argparse
parser, so a command added to the parser is documented here without a second list; one
that no group names is listed under "Other commands".
"""

from __future__ import annotations

import argparse
from typing import Any

# (title, keyword, commands), in virsh's order; a command absent from the parser is skipped
GROUPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "Domain Management",
        "domain",
        (
            "define",
            "destroy",
            "domjobabort",
            "domjobinfo",
            "domname",
            "domuuid",
            "dumpxml",
            "evacuate",
            "event",
            "migrate",
            "migrate-getspeed",
            "migrate-setmaxdowntime",
            "migrate-setspeed",
            "resume",
            "shutdown",
            "start",
            "suspend",
            "undefine",
        ),
    ),
    ("Domain Monitoring", "monitor", ("dominfo", "domstate", "jobs", "list")),
    ("Certificates", "pki", ("pki",)),
    ("Migctl itself", "migctl", ("help",)),
)


class HelpError(Exception):
    """``migctl help WORD`` for a word that is neither a command nor a group keyword."""


def _subcommands(parser: argparse.ArgumentParser) -> tuple[dict[str, Any], dict[str, str]]:
    """(name -> subparser, name -> one-line help) of the parser's commands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            lines = {a.dest: a.help or "" for a in action._choices_actions}
            return dict(action.choices), lines
    return {}, {}


def overview(parser: argparse.ArgumentParser, keyword: str | None = None) -> str:
    """Every command, grouped (or one group, by its keyword)."""
    parsers, lines = _subcommands(parser)
    groups = [(t, k, [c for c in cs if c in parsers]) for t, k, cs in GROUPS]
    grouped = {c for _, _, cs in groups for c in cs}
    others = sorted(c for c in parsers if c not in grouped)
    if others:
        groups.append(("Other commands", "other", others))
    out = [] if keyword else ["Grouped commands:", ""]
    for title, kw, commands in groups:
        if keyword not in (None, kw) or not commands:
            continue
        out.append(f" {title} (help keyword '{kw}'):")
        out += [f"    {c:<30} {lines.get(c, '')}".rstrip() for c in commands]
        out.append("")
    return "\n".join(out) + "\n"


def _value_word(action: argparse.Action) -> str:
    if action.type is int or action.type is float:
        return "<number>"
    return "<string>"


def _option_entry(action: argparse.Action) -> tuple[str, str] | None:
    """One OPTIONS row: (spelling, help); None for --help, which every command has."""
    if isinstance(action, argparse._HelpAction):
        return None
    if isinstance(action, argparse._SubParsersAction):
        names = ", ".join(action.choices)
        return f"<{action.dest or 'command'}>", f"one of: {names}"
    text = action.help or ""
    if not action.option_strings:
        # migctl takes operands by position only (virsh's [--domain] spelling is not taken)
        word = f"<{str(action.metavar or action.dest).lower()}>"
        return (f"[{word}]" if action.nargs == "?" else word), text
    name = max(action.option_strings, key=len)
    if action.nargs == 0:
        return name, text
    return f"{name} {_value_word(action)}", text


def _synopsis(name: str, sub: argparse.ArgumentParser) -> str:
    words = [name]
    for action in sub._actions:
        entry = _option_entry(action)
        if entry is None:
            continue
        spelled = entry[0]
        if not action.option_strings or action.required:
            words.append(spelled)
        else:
            words.append(f"[{spelled}]")
    return " ".join(words)


def command_page(parser: argparse.ArgumentParser, name: str) -> str:
    """``virsh help COMMAND``'s page for one command; HelpError if there is none."""
    parsers, lines = _subcommands(parser)
    sub = parsers.get(name)
    if sub is None:
        if any(kw == name for _, kw, _ in GROUPS) or name == "other":
            return overview(parser, name)
        raise HelpError(f"command or command group '{name}' doesn't exist")
    rows = [e for e in map(_option_entry, sub._actions) if e is not None]
    width = max([len(r[0]) for r in rows] + [0])
    out = [
        "  NAME",
        f"    {name} - {lines.get(name, '')}",
        "",
        "  SYNOPSIS",
        f"    {_synopsis(name, sub)}",
        "",
        "  DESCRIPTION",
        f"    {sub.description or lines.get(name, '')}",
        "",
    ]
    if rows:
        out.append("  OPTIONS")
        out += [f"    {spelled:<{width}}  {text}".rstrip() for spelled, text in rows]
        out.append("")
    return "\n".join(out) + "\n"
