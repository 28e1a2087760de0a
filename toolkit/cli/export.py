"""`toolkit export onnx` (a whole sampler or the network) and `toolkit export-dataset`."""

from __future__ import annotations

from pathlib import Path

import click

from toolkit.cli.base import cli
from toolkit.cli.common import (dataset_arg, hold_output_lock, parse_options, pipeline_options,
                               sampler_and_guidance_options)
from toolkit.errors import ToolkitError


@cli.group("export")
def export_group() -> None:
    """Export a model or a whole sampler for other runtimes."""


@export_group.command("onnx")
@click.option("--component", type=click.Choice(["sampler", "predictor"]), default="sampler", show_default=True,
              help="sampler: the whole sampling run as one graph; predictor: the network ε_θ(x, t, y) alone.")
@pipeline_options()
@click.option("--layout", type=click.Choice(["loop", "unrolled"]), default="loop", show_default=True,
              help="An ONNX Loop over one step (small, loads fast) or every step unrolled.")
@click.option("--noise", "noise_mode", type=click.Choice(["seed", "inputs"]), default="seed", show_default=True,
              help="seed: inputs seed and index, the graph makes its own noise (the same samples as "
                   "`compose --seed` everywhere); inputs: the app feeds x_T (and noise).")
@click.option("--task", type=click.Choice(["sample", "inpaint"]), default="sample", show_default=True,
              help="sample: noise → samples; inpaint: RePaint inpainting, with inputs image and mask (1 = fill in).")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="The network's weights and arithmetic; fp16 is for onnxruntime's CUDA provider (the loop stays fp32).")
@click.option("--resample", default=None, type=int, help="--task inpaint: runs of each block of steps (RePaint's r).")
@click.option("--jump", default=None, type=int, help="--task inpaint: iterations per resampled block (RePaint's j).")
@click.option("--out", required=True, type=click.Path(), help="The .onnx file to write (and its metadata as "
              "FILE.json).")
def export_onnx_cmd(model, component, schedule, sampler, steps, eta, spacing, variance, sampler_options,
                    num_timesteps, guidance, scale, classifier, layout, noise_mode, task, precision, resample, jump, out) -> None:
    """Write an ONNX graph that onnxruntime runs without torch.

    With --guidance cfg the scale is a graph input (one per sample); --scale is the default recorded
    in the graph's metadata.
    """
    import time

    import toolkit
    from toolkit.exporters import onnx as exporter

    if Path(out).suffix != ".onnx":
        raise ToolkitError(f"--out must be a .onnx file, got {out!r}")
    if not Path(out).parent.resolve().is_dir():
        raise ToolkitError(f"output folder {str(Path(out).parent)!r} does not exist")
    hold_output_lock(out)
    options, guidance_options = sampler_and_guidance_options(sampler_options, eta, spacing, variance, guidance,
                                                             scale, classifier)
    t0 = time.perf_counter()
    if component == "predictor":
        if guidance is not None or options or steps is not None or task != "sample" or precision != "fp32":
            raise ToolkitError("--component predictor exports the network alone: drop the sampler and guidance options")
        from toolkit.pipeline import load_predictor

        predictor, _, config = load_predictor(model)  # any noise-predictor task's checkpoint, as compose takes
        path = exporter.export_predictor(predictor, out, config=config)
    else:
        pipe = toolkit.compose(schedule=schedule, sampler=sampler, model=model, guidance=guidance, steps=steps,
                               num_timesteps=num_timesteps, guidance_options=guidance_options, **options)
        path = exporter.export_sampler(pipe, out, layout=layout, noise=noise_mode, task=task, resample=resample,
                                       jump=jump, precision=precision)
    size = Path(path).stat().st_size
    click.echo(f"wrote {path} ({size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s)")


@cli.command("export-dataset")
@click.argument("dataset")
@click.option("--data-option", "data_options", multiple=True, metavar="KEY=VALUE", help="Dataset option (repeatable).")
@click.option("--format", "fmt", type=click.Choice(["png", "npz"]), default="png", show_default=True,
              help="png: a folder of images, one sub-folder per class; npz: one array file (x, y).")
@click.option("--out", required=True, type=click.Path(), help="A new folder (png) or .npz file; never overwritten.")
def export_dataset_cmd(dataset, data_options, fmt, out) -> None:
    """Write a data set out as image files or an array, e.g. to try a folder data set on real files."""
    from toolkit.datasets_export import export_dataset
    from toolkit.registry import create

    name, options = dataset_arg(dataset, parse_options(data_options, "--data-option"))
    data = create("dataset", name, **options)
    path = export_dataset(data, out, fmt)
    click.echo(f"wrote {path} ({len(data)} samples of {data.name}, {fmt})")
