"""`toolkit tune-grid`: a sampler's few-step time grid tuned to one model (``toolkit.tuned_grid``)."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import click

from toolkit import budget
from toolkit.cli.base import cli
from toolkit.cli.common import SEED, pipeline_options, sampler_and_guidance_options, set_threads
from toolkit.errors import ToolkitError


@cli.command("tune-grid")
@pipeline_options()
@click.option("-n", "n", default=256, show_default=True, type=int, help="Draws of x_T the error is measured on.")
@click.option("--seed", default=1000, show_default=True, type=SEED,
              help="Seed of those draws (keep it apart from the seeds you evaluate with).")
@click.option("--sweeps", default=8, show_default=True, type=click.IntRange(min=0), help="Coordinate-descent passes.")
@click.option("--shift/--no-shift", default=True, show_default=True,
              help="Also tune the time the network is told at each step (listed as step@time).")
@click.option("--reference-nfe", default=500, show_default=True, type=click.IntRange(min=2),
              help="Steps of the DPM-Solver++ solution the sampler is brought close to.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@click.option("--out", default=None, type=click.Path(), help="Also write the JSON to this file.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch.")
@click.option("--quiet", "-q", is_flag=True, help="No line per sweep.")
def tune_grid_cmd(schedule, sampler, steps, eta, spacing, variance, sampler_options, num_timesteps, model, guidance,
                  scale, classifier, n, seed, sweeps, shift, reference_nfe, as_json, out, device, threads,
                  quiet) -> None:
    """Tune a deterministic sampler's time grid to a model: prints a --spacing that lists the steps.

    The step times (and, with --shift, the times the network is told) move by coordinate descent to bring
    the sampler's output closest to the model's probability-flow ODE solution from the same x_T; --spacing
    is the grid to start from and fixes the first time. Sample with the printed spacing:
    toolkit compose --sampler unipc --spacing 999@991,908@915,...
    """
    from toolkit.files import atomic_write
    from toolkit.tuned_grid import tune_grid

    if out is not None and (Path(out).suffix != ".json" or not Path(out).parent.resolve().is_dir()):
        raise ToolkitError(f"--out must be a .json file in an existing folder, got {out!r}")
    set_threads(threads)
    n = budget.samples(n)
    if budget.active():  # TOOLKIT_BUDGET=small: one pass against a short reference, to try the command line
        sweeps, reference_nfe = min(sweeps, 1), min(reference_nfe, 50)
    options, guidance_options = sampler_and_guidance_options(sampler_options, eta, spacing, variance, guidance,
                                                             scale, classifier)

    def report(sweep: int, error: float) -> None:
        if not quiet:
            click.echo(f"sweep {sweep + 1}/{sweeps}: RMS distance {error:.5f}", err=True)

    result = tune_grid(model, sampler, steps, schedule=schedule, num_timesteps=num_timesteps,
                       guidance=guidance, guidance_options=guidance_options or None, n=n, seed=seed, sweeps=sweeps,
                       shift=shift, reference_nfe=reference_nfe, device=device, on_sweep=report, **options)
    payload = {"model": model or "digits", **attrs.asdict(result)}
    if as_json:
        click.echo(json.dumps(payload, indent=2))
    else:
        click.echo(f"{result.sampler}, {result.steps} steps: RMS distance to the {result.reference_nfe}-NFE ODE "
                   f"solution {result.start_error:.4f} on its own grid, {result.error:.4f} tuned "
                   f"(n={result.n}, seed {result.seed})")
        click.echo(f"--spacing {result.spacing}")
    if out is not None:
        text = json.dumps(payload, indent=2)
        atomic_write(Path(out), lambda tmp: Path(tmp).write_text(text))
