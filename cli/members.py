"""`--member JSON_OR_FILE`: members as data on the command line.

A member is a JSON object (``'{"width": [0.5, 1, 1], "depth": [1, 3, 3]}'``) given inline or
as a file holding one object or a list of them (a ``zoo search`` front entry's ``member`` works
too). The model validates the fields; this module only reads them.
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
    help='A member as JSON, e.g. \'{"width": [0.5, 1, 1], "depth": [1, 3, 3]}\', or a file holding one (or a list).',
)


def parse_members(values: Optional[List[str]]) -> list[dict]:
    """Every member the ``--member`` values give, in order; one-line errors for bad JSON."""
    members: list[dict] = []
    for value in values or []:
        text = value.strip()
        if not text.startswith(("{", "[")):
            path = Path(value)
            if not path.is_file():
                raise ValueError(f"--member {value!r} is neither JSON nor a file")
            text = path.read_text()
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--member {value!r} is not valid JSON ({err.msg} at character {err.pos})") from None
        schema = zoo_module("schema")
        schema.check(parsed, schema.MEMBER_ARGUMENT, f"--member {value!r}")
        for item in parsed if isinstance(parsed, list) else [parsed]:
            members.append(item["member"] if isinstance(item.get("member"), dict) else item)
    return members


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
