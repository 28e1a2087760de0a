"""`toolkit show RUN`: what a checkpoint holds and how its training went, and its loss curve as a PNG."""

from __future__ import annotations

import json

import click

from toolkit.cli.base import cli
from toolkit.cli.common import hold_output_lock
from toolkit.errors import ToolkitError


@cli.command("show")
@click.argument("run")
@click.option("--plot", default=None, type=click.Path(), help="Write the loss curve (and held-out loss) as a PNG.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show_cmd(run, plot, as_json) -> None:
    """Summarize a checkpoint directory: its model, steps, loss, held-out scores, previews and commands."""
    from pathlib import Path

    from toolkit.checkpoint import resolve_checkpoint
    from toolkit.feedback import loss_curve, summary

    path = resolve_checkpoint(run)
    if plot is not None:
        from toolkit.images import check_output

        if Path(plot).suffix.lower() != ".png":
            raise ToolkitError(f"--plot must be a .png file, got {plot!r}")
        check_output(plot, (".png",))
        hold_output_lock(plot)
    info = summary(path)
    picture = loss_curve(path) if plot is not None else None
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        def fmt(v, spec=".4f"):
            return "-" if v is None else format(v, spec)

        click.echo(f"{info['path']}: {info['kind']} {info['model']}, {fmt(info['parameters'], ',')} parameters, "
                   f"{info['schedule'] or '-'} schedule")
        click.echo(f"  step {info['step']} of {info['steps']}, loss {fmt(info['loss'])}, "
                   f"{fmt(info['elapsed_s'], '.1f')} s of training")
        if info["holdout_loss"] is not None or info["holdout_accuracy"] is not None:
            click.echo(f"  held out: loss {fmt(info['holdout_loss'])}, accuracy {fmt(info['holdout_accuracy'], '.3f')}")
        last = info["last"]
        if last is not None:
            click.echo(f"  metrics.jsonl: {info['rows']} rows; last: lr {last.get('lr', 0):.3g}, gradient norm "
                       f"{last.get('grad_norm', float('nan')):.3g}, {last.get('steps_per_s', float('nan')):.1f} steps/s")
        if info["previews"]:
            click.echo(f"  previews: {', '.join(info['previews'])}")
        for command in info["commands"]:
            click.echo(f"  ran: {command}")
    if picture is not None:
        from toolkit.files import atomic_write
        from toolkit.images import png_bytes

        data = png_bytes(picture)
        atomic_write(Path(plot), lambda tmp: Path(tmp).write_bytes(data))
        if not as_json:
            click.echo(f"wrote {plot}")
