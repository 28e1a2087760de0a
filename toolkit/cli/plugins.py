"""`toolkit plugins`: every registered plugin by kind, and the plugins that failed to load."""

from __future__ import annotations

import json

import click

from toolkit.cli.base import cli


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins_cmd(as_json: bool) -> None:
    """List every registered plugin by kind, the commands plugins add, and plugins that failed to load."""
    from toolkit.registry import KINDS, get_registry

    reg = get_registry()
    rows = {kind: [{"name": e.name, "aliases": list(e.aliases), "dist": e.dist, "version": e.version,
                    "plugin": e.plugin} for e in sorted(reg.entries[kind], key=lambda e: e.name)]
            for kind in KINDS}
    failed = [{"plugin": f.plugin, "dist": f.dist, "version": f.version, "error": f.error} for f in reg.failures]
    commands = [{"name": c.name, "dist": c.dist, "version": c.version, "plugin": c.plugin}
                for c in sorted(reg.commands.values(), key=lambda c: c.name)]
    if as_json:
        click.echo(json.dumps({"plugins": rows, "commands": commands, "failed": failed}, indent=2))
        return
    for kind in KINDS:
        if not rows[kind]:
            continue
        click.echo(f"{kind}:")
        for r in rows[kind]:
            alias = f" (aliases: {', '.join(r['aliases'])})" if r["aliases"] else ""
            click.echo(f"  {r['name']:<16} {r['dist']} {r['version']}{alias}")
    if commands:
        click.echo("command:")
        for c in commands:
            click.echo(f"  {c['name']:<16} {c['dist']} {c['version']}")
    if failed:
        click.echo("failed:")
        for f in failed:
            click.echo(f"  {f['plugin']:<16} {f['dist']} {f['version']}: {f['error']}")
