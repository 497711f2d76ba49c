"""KEY=value files as systemd reads an EnvironmentFile=: a value of plain
characters as it is, any other in double quotes with a backslash before
`"`, `\\`, `` ` `` and `$` (the four that POSIX sh escapes in double quotes
too), so that any printable value, spaces, quotes, `#` and backslashes
included, reads back as written, by systemd and by the agent (which reads
the file itself, never through a shell). Shipped with the agent."""

from __future__ import annotations

import re
from collections.abc import Iterable

_PLAIN = re.compile(r"[A-Za-z0-9_@+=:,./-]+")
_ESCAPED = '"\\`$'


def quote(value: str) -> str:
    if _PLAIN.fullmatch(value):
        return value
    return '"' + "".join("\\" + c if c in _ESCAPED else c for c in value) + '"'


def unquote(text: str) -> str:
    """A value as quote() wrote it; an unquoted one (older files) as it stands."""
    if len(text) < 2 or not (text[0] == text[-1] == '"'):
        return text
    out, chars = [], iter(text[1:-1])
    for c in chars:
        out.append(next(chars, "") if c == "\\" else c)
    return "".join(out)


def text(values: dict[str, str]) -> str:
    return "".join(f"{k}={quote(v)}\n" for k, v in values.items())


def value(lines: Iterable[str], variable: str) -> str | None:
    """The variable's value in the lines of such a file, or None."""
    for line in lines:
        if line.startswith(f"{variable}="):
            return unquote(line.removeprefix(f"{variable}="))
    return None
