"""`--member JSON_OR_FILE`: members as data on the command line.

A member is a JSON object (``'{"width": [0.5, 1, 1], "depth": [1, 3, 3]}'``) given inline or
as a file holding one object or a list of them (a ``zoo search`` front entry's ``member`` works
too). A search's ``pareto.json`` gives its chosen member, ``pareto.json#N`` entry N of its
front. The model validates the fields; this module only reads them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from .common import zoo_module

MEMBER = typer.Option(
    None,
    "--member",
    metavar="JSON_OR_FILE",
    help='A member as JSON, e.g. \'{"width": [0.5, 1, 1], "depth": [1, 3, 3]}\', or a file holding one (or a list); '
    "a search's pareto.json: its chosen member, pareto.json#N: entry N of its front.",
)


def parse_members(values: Optional[List[str]]) -> list[dict]:
    """Every member the ``--member`` values give, in order; one-line errors for bad JSON."""
    members: list[dict] = []
    for value in values or []:
        parsed = _read(value)
        if isinstance(parsed, dict) and isinstance(parsed.get("front"), list) and "best" in parsed:
            parsed = _from_search(value, parsed)
        elif not value.strip().startswith(("{", "[")) and _split_entry(value)[1] is not None:
            raise ValueError(f"--member {value!r}: FILE#N picks entry N of a zoo search's pareto.json front")
        schema = zoo_module("schema")
        schema.check(parsed, schema.MEMBER_ARGUMENT, f"--member {value!r}")
        for item in parsed if isinstance(parsed, list) else [parsed]:
            members.append(item["member"] if isinstance(item.get("member"), dict) else item)
    return members


def _read(value: str):
    """The JSON of an inline value or of a file (``FILE#N``: the file)."""
    text = value.strip()
    if not text.startswith(("{", "[")):
        path = Path(_split_entry(value)[0])
        if not path.is_file():
            raise ValueError(f"--member {value!r} is neither JSON nor a file")
        text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--member {value!r} is not valid JSON ({err.msg} at character {err.pos})") from None


def _split_entry(value: str) -> tuple[str, int | None]:
    """``FILE#N`` as (FILE, N); a file whose own name holds ``#`` stays whole."""
    name, hash_sign, entry = value.rpartition("#")
    if hash_sign and entry.isdigit() and not Path(value).exists():
        return name, int(entry)
    return value, None


def _from_search(value: str, report: dict) -> dict:
    """A `zoo search` report (pareto.json): its chosen member, or ``#N``: entry N of its front."""
    _, entry = _split_entry(value)
    if entry is None:
        return report["best"]
    front = report["front"]
    if not 0 <= entry < len(front):
        raise ValueError(f"--member {value!r}: the front has {len(front)} entries, numbered 0 to {len(front) - 1}")
    return front[entry]


def one_member(values: Optional[List[str]], width: Optional[float], rank: Optional[float]):
    """The member of a command that takes one: ``--member``, or the uniform ``--width``/``--rank``."""
    members = parse_members(values)
    if len(members) > 1:
        raise ValueError(f"this command takes one --member, got {len(members)}")
    if members and (width is not None or rank is not None):
        raise ValueError("give --member or --width/--rank, not both")
    if members:
        from zoo import Member

        return Member.from_dict(members[0])
    return width
