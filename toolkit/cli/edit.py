"""`toolkit invert` (images → x_T by DDIM inversion) and `toolkit interpolate` (a strip between two images)."""

from __future__ import annotations

import click

from toolkit.cli.base import cli
from toolkit.cli.common import compose_pipeline, hold_output_lock, parse_classes, pipeline_options
from toolkit.errors import ToolkitError


def _label(class_, pipe) -> list[int] | None:
    labels, nrow = parse_classes(class_, 1, pipe.num_classes)
    if nrow is not None:
        raise ToolkitError("--class takes a label or a comma list here, not 'all'")
    return labels


@cli.command("invert")
@pipeline_options()
@click.option("--input", "input_file", required=True, type=click.Path(),
              help="Images to invert: a .npy [N, C, H, W] in [-1, 1] (or one [C, H, W]) or a PNG.")
@click.option("--class", "class_", default=None, help="Label(s) the model is conditioned on while inverting.")
@click.option("--out", required=True, type=click.Path(), help="The .npy of x_T [N, *sample_shape] to write.")
@click.option("--device", default="cpu", show_default=True)
def invert_cmd(schedule, sampler, steps, eta, spacing, variance, sampler_options, num_timesteps, model, guidance,
               scale, classifier, input_file, class_, out, device) -> None:
    """Run a deterministic sampler backwards (DDIM inversion): images → the x_T that `compose --noise` decodes
    back to them."""
    from toolkit import editing
    from toolkit.images import check_output, write_npy

    check_output(out, (".npy",))
    hold_output_lock(out)
    pipe = compose_pipeline(schedule, sampler, steps, eta, spacing, variance, sampler_options, num_timesteps, model,
                            guidance, scale, classifier, device=device)
    x0 = editing.load_images(input_file, pipe.output_shape)
    x_T = pipe.invert(x0, _label(class_, pipe))
    write_npy(out, tuple(x_T.shape), [x_T])
    click.echo(f"wrote {out} ({len(x_T)} x_T, {pipe.sampler.name} {pipe.steps} steps backwards)")


@cli.command("interpolate")
@click.argument("image_a", type=click.Path())
@click.argument("image_b", type=click.Path())
@pipeline_options()
@click.option("--frames", default=8, show_default=True, type=click.IntRange(min=2), help="Images in the strip.")
@click.option("--class", "class_", default=None, help="Label of a class-conditional model (both images).")
@click.option("--out", required=True, type=click.Path(), help="A .png strip or a .npy [frames, C, H, W].")
@click.option("--device", default="cpu", show_default=True)
def interpolate_cmd(image_a, image_b, schedule, sampler, steps, eta, spacing, variance, sampler_options,
                    num_timesteps, model, guidance, scale, classifier, frames, class_, out, device) -> None:
    """Images between A and B: both inverted to x_T, x_T interpolated spherically (DDIM paper §5.3), decoded."""
    from toolkit import editing
    from toolkit.images import check_output, save_samples

    check_output(out)
    hold_output_lock(out)
    pipe = compose_pipeline(schedule, sampler, steps, eta, spacing, variance, sampler_options, num_timesteps, model,
                            guidance, scale, classifier, device=device)
    a = editing.load_images(image_a, pipe.output_shape, "image A")[:1]
    b = editing.load_images(image_b, pipe.output_shape, "image B")[:1]
    strip = pipe.interpolate(a, b, frames, _label(class_, pipe))
    save_samples(strip, out, nrow=frames)
    click.echo(f"wrote {out} ({frames} frames, {pipe.sampler.name} {pipe.steps} steps)")
