"""The `disagg` command line: a thin layer over the library, one module per
group of commands. An error of ours ends a command with one `error:` line
per line of its message and its layer's exit status (disagg.core.errors)."""

from __future__ import annotations

import click

from disagg.core.errors import DisaggError


class Main(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DisaggError as e:
            for line in str(e).splitlines():
                click.echo(f"error: {line}", err=True)
            ctx.exit(e.exit_code)


@click.group(cls=Main)
@click.version_option(package_name="disagg")
def main() -> None:
    """Disaggregated LLM serving (context/generate workers behind vllm-router)
    as infrastructure-as-code. Deploy with pyinfra: see README.md."""


def table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


# after main and table, which the command modules use
from disagg.cli import deploying, measuring, operating, testing  # noqa: E402

for _module in (deploying, operating, measuring, testing):
    for _command in _module.COMMANDS:
        main.add_command(_command)
