"""`toolkit compose` (sample a composed pipeline, or an exported graph) and `toolkit merge` (join shards)."""

from __future__ import annotations

import time

import click

from toolkit import budget
from toolkit.cli.base import cli
from toolkit.cli.common import (SEED, backend_options, command_line, compose_pipeline, hold_output_lock,
                               parse_classes, pipeline_options, progress_bar, set_threads, threads_text)
from toolkit.errors import ToolkitError
from toolkit.inpainting import DEFAULT_JUMP, DEFAULT_RESAMPLE


@cli.command("compose")
@pipeline_options()
@click.option("--latent", default=None, help="Autoencoder of a latent model (default: the one it records).")
@click.option("--class", "class_", default=None, help="Label, comma list of labels, or 'all'.")
@click.option("-n", "n", default=64, show_default=True, type=int, help="Number of samples.")
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--batch-size", default=500, show_default=True, type=int)
@click.option("--out", default="samples.png", show_default=True, type=click.Path(), help=".png grid or .npy array.")
@click.option("--device", default="cpu", show_default=True)
@backend_options()
@click.option("--cuda-graphs", is_flag=True,
              help="Torch backend on --device cuda: capture the whole sampling loop as one CUDA graph per batch size "
                   "and replay it (no per-step kernel launches from Python; the same samples).")
@click.option("--onnx", "onnx_file", default=None, type=click.Path(),
              help="Sample a graph from `toolkit export onnx` with onnxruntime (sampler, steps, guidance from it).")
@click.option("--layout", type=click.Choice(["loop", "unrolled"]), default="loop", show_default=True,
              help="Graph layout when exporting for onnxruntime on the fly.")
@click.option("--noise", "noise_file", default=None, type=click.Path(),
              help="x_T to decode: a .npy [N, *sample_shape] from `toolkit invert` (N samples; torch backend).")
@click.option("--init", "init_file", default=None, type=click.Path(),
              help="img2img (SDEdit): images to edit, a .npy [N, C, H, W] in [-1, 1] or a PNG (torch backend).")
@click.option("--strength", default=None, type=float,
              help="With --init: the noise level s in (0, 1] the images are taken to before denoising [default: 0.5].")
@click.option("--mask", default=None,
              help="With --init: inpaint where the mask is 1 (RePaint): lower-half, upper-half, left-half, right-half, "
                   "center, or a .npy of 0/1 or a PNG (white = fill in).")
@click.option("--resample", default=None, type=int,
              help=f"With --mask: runs of each block of steps (RePaint's r; 1 = no resampling) [default: {DEFAULT_RESAMPLE}].")
@click.option("--jump", default=None, type=int,
              help=f"With --mask: iterations per resampled block (RePaint's jump length j) [default: {DEFAULT_JUMP}].")
@click.option("--quiet", "-q", is_flag=True)
def compose_cmd(schedule, sampler, steps, eta, spacing, variance, sampler_options, num_timesteps, model, latent,
                guidance, scale, classifier, class_, n, seed, batch_size, out, device, backend, threads, cuda_graphs,
                onnx_file, layout, noise_file, init_file, strength, mask, resample, jump, quiet) -> None:
    """Compose a pipeline from named plugins and sample from it."""
    started_ns = time.time_ns()
    from toolkit.backends import check_threads
    from toolkit.images import check_output
    from toolkit.shards import is_shard_folder
    from toolkit.world import world_from_env

    world = world_from_env()
    sharded = is_shard_folder(out, world)
    if sharded and backend == "onnxruntime":
        raise ToolkitError("sharded sampling (--out FOLDER/ or torchrun) uses --backend torch")
    threads = check_threads(threads)
    if cuda_graphs:
        _check_cuda_graphs(device, backend, onnx_file, noise_file, init_file, strength, mask)
    if not sharded:
        check_output(out)
        hold_output_lock(out)
    if n < 1:
        raise ToolkitError(f"-n must be positive, got {n}")
    n = budget.samples(n)
    if batch_size < 1:
        raise ToolkitError(f"--batch-size must be positive, got {batch_size}")
    key = None
    if (backend == "auto" and not sharded and device == "cpu" and onnx_file is None
            and all(v is None for v in (noise_file, init_file, strength, mask, resample, jump))):
        from toolkit import graph_index

        key = _request_key(schedule=schedule, sampler=sampler, steps=steps, eta=eta, spacing=spacing,
                           variance=variance, sampler_options=list(sampler_options), num_timesteps=num_timesteps,
                           model=model, latent=latent, guidance=guidance, scale=scale, classifier=classifier,
                           layout=layout)
        entry = graph_index.lookup(key)
        if entry is not None:
            _compose_recorded(entry, class_, n, seed, batch_size, out, scale, threads, guidance, quiet)
            return
    if onnx_file is not None:
        from click.core import ParameterSource

        ctx = click.get_current_context()
        if backend == "torch" and ctx.get_parameter_source("backend") == ParameterSource.COMMANDLINE:
            raise ToolkitError("--onnx runs the graph with onnxruntime: drop --backend torch")
        given = [p for p in ("schedule", "sampler", "steps", "eta", "spacing", "variance", "sampler_options",
                             "num_timesteps", "model", "latent", "guidance", "classifier")
                 if ctx.get_parameter_source(p) != ParameterSource.DEFAULT]
        if given:
            raise ToolkitError(f"--onnx takes the model, sampler and guidance from the graph: drop --{given[0].replace('_', '-')}")
        if noise_file is not None or strength is not None:
            raise ToolkitError("--noise and --strength sample with the torch backend: drop --onnx")
        if resample is not None or jump is not None:
            raise ToolkitError("an inpainting graph has its resample and jump built in (export onnx --task inpaint "
                               "--resample --jump): drop them here")
        _compose_onnx(onnx_file, class_, n, seed, batch_size, out, device, scale, threads, init_file, mask)
        return
    set_threads(threads)
    if resample is not None or jump is not None:
        if mask is None:
            raise ToolkitError("--resample and --jump are options of inpainting: give --init and --mask")
    from toolkit.checkpoint import recording_reads

    with recording_reads() as reads:
        pipe = compose_pipeline(schedule, sampler, steps, eta, spacing, variance, sampler_options, num_timesteps,
                                model, guidance, scale, classifier, device=device, batch_size=batch_size, latent=latent,
                                cuda_graphs=cuda_graphs)
    if mask is not None:
        _compose_inpaint(pipe, init_file, mask, strength, noise_file, resample, jump, class_, n, seed, out, backend,
                         sharded, scale, quiet)
        return
    if noise_file is not None or init_file is not None or strength is not None:
        _compose_edit(pipe, noise_file, init_file, strength, class_, n, seed, out, backend, sharded, scale, quiet)
        return
    labels, nrow = parse_classes(class_, n, pipe.num_classes)
    if guidance is not None and labels is None:
        raise ToolkitError(f"--guidance {guidance} needs --class (a label, a comma list or 'all')")
    if labels is not None and nrow is not None:
        n = len(labels)
    if sharded:
        from toolkit.distributed import local_device, shard
        from toolkit.shards import sample_shard

        if pipe.device.type == "cuda" and world.distributed:
            from attrs import evolve

            pipe = evolve(pipe, device=local_device(pipe.device, world))
        start, stop = shard(n, world)
        with progress_bar(-(-(stop - start) // batch_size) * pipe.iterations, f"sample (rank {world.rank})",
                          quiet or not world.main) as bar:
            path = sample_shard(pipe, out, n, seed, labels, world, scale=scale,
                                progress=(lambda k: bar.update(k)) if bar is not None else None,
                                meta={"command": command_line(click.get_current_context())})
        click.echo(f"rank {world.rank}: wrote {path} (samples {start}..{stop - 1} of {n})")
        return
    from toolkit.backends import select
    from toolkit.images import save_stream

    engine = select(pipe, backend, threads=threads, layout=layout)
    batches = -(-n // batch_size)
    with progress_bar(batches * pipe.iterations, f"sample ({engine.name})", quiet) as bar:
        save_stream(out, (n, *pipe.output_shape), lambda: engine.batches(
            n, seed, labels, scale=scale, progress=(lambda k: bar.update(k)) if bar is not None else None), nrow=nrow)
    why = f"; {engine.reason}" if backend == "auto" else ""
    describe = {"sampler": pipe.sampler.name, "steps": pipe.steps, "nfe": pipe.nfe, "schedule": pipe.schedule.name,
                "iterations": pipe.iterations}
    click.echo(f"wrote {out} ({n} samples, {_describe(describe)}, {engine.label}{why})")
    if key is not None and engine.name == "onnxruntime":
        from toolkit import graph_index

        graph_index.record(key, engine.graph, engine.reason, describe, reads, started_ns)


def _check_cuda_graphs(device, backend, onnx_file, noise_file, init_file, strength, mask) -> None:
    """--cuda-graphs: a torch-backend option for sampling from noise on a CUDA device."""
    if backend == "onnxruntime" or onnx_file is not None:
        raise ToolkitError("--cuda-graphs is an option of the torch backend: drop --backend onnxruntime / --onnx")
    if not str(device).startswith("cuda"):
        raise ToolkitError(f"--cuda-graphs needs --device cuda, not {device!r}")
    given = [name for name, v in (("--noise", noise_file), ("--init", init_file), ("--strength", strength),
                                  ("--mask", mask)) if v is not None]
    if given:
        raise ToolkitError(f"--cuda-graphs captures sampling from seeds: drop {given[0]}")


def _request_key(**options) -> str:
    """The ``graph_index`` key of a compose request: the options that compose its pipeline."""
    from toolkit import graph_index

    options["guidance_options"] = click.get_current_context().meta.get("guidance_options", {})
    return graph_index.request_key(options)


def _describe(d: dict) -> str:
    return f"{d['sampler']} {d['steps']} steps = {d['nfe']} network calls, {d['schedule']} schedule"


def _compose_recorded(entry, class_, n, seed, batch_size, out, scale, threads, guidance, quiet) -> None:
    """compose for a request recorded in ``toolkit.graph_index``: its verified graph, sampled without torch."""
    from toolkit.backends import graph_batches, open_session
    from toolkit.images import save_stream

    session = open_session(entry.graph, "cpu", threads)
    labels, nrow = parse_classes(class_, n, session.num_classes)
    if guidance is not None and labels is None:
        raise ToolkitError(f"--guidance {guidance} needs --class (a label, a comma list or 'all')")
    if labels is not None and nrow is not None:
        n = len(labels)
    steps = entry.describe["iterations"]
    with progress_bar(-(-n // batch_size) * steps, "sample (onnxruntime)", quiet) as bar:
        def ticking():
            for x in graph_batches(session, n, seed, labels, scale, batch_size=batch_size):
                if bar is not None:
                    bar.update(steps)
                yield x

        save_stream(out, (n, *session.output_shape), ticking, nrow=nrow)
    click.echo(f"wrote {out} ({n} samples, {_describe(entry.describe)}, onnxruntime {session.provider}, "
               f"{threads_text(session.threads)}; {entry.reason})")


def _compose_edit(pipe, noise_file, init_file, strength, class_, n, seed, out, backend, sharded, scale, quiet) -> None:
    """compose --noise x_T.npy (decode inverted x_T) or --init images --strength s (img2img): the torch loop."""
    from toolkit import editing
    from toolkit.images import save_stream

    if noise_file is not None and init_file is not None:
        raise ToolkitError("--noise gives x_T, --init gives images to edit: use one of them")
    if strength is not None and init_file is None:
        raise ToolkitError("--strength needs --init")
    if backend == "onnxruntime" or sharded:
        raise ToolkitError("--noise and --init sample with the torch backend into one file: drop --backend "
                           "onnxruntime (and a sharded --out)")
    if noise_file is not None:
        x = editing.load_noise(noise_file, pipe.sample_shape)
    else:
        x = editing.load_images(init_file, pipe.output_shape, "--init")
        strength = editing.check_strength(0.5 if strength is None else strength)
    n = _edit_count(n, x)
    labels, nrow = parse_classes(class_, n, pipe.num_classes)
    if pipe.guidance is not None and labels is None:
        raise ToolkitError(f"--guidance {pipe.guidance.name} needs --class (a label, a comma list or 'all')")
    if nrow is not None:
        raise ToolkitError("--class all takes its own number of samples: give labels (a label or a comma list)")
    runs = pipe if noise_file is not None else editing.truncated(pipe, strength)
    with progress_bar(-(-n // pipe.batch_size) * runs.iterations, "sample", quiet) as bar:
        tick = (lambda k: bar.update(k)) if bar is not None else None
        if noise_file is not None:
            make = lambda: pipe.batches(n, seed, labels, noise=x, scale=scale, progress=tick)  # noqa: E731
            what = "decoded x_T"
        else:
            make = lambda: editing.edit_batches(pipe, x, strength, seed, labels, scale=scale, progress=tick)  # noqa: E731
            what = f"img2img at strength {strength:g}"
        save_stream(out, (n, *pipe.output_shape), make)
    click.echo(f"wrote {out} ({n} samples, {what}, {pipe.sampler.name} {pipe.steps} steps, torch)")


def _edit_count(n: int, images) -> int:
    """The number of samples of an editing run: the images'; -n, if given, must agree."""
    from click.core import ParameterSource

    given_n = click.get_current_context().get_parameter_source("n") != ParameterSource.DEFAULT
    if given_n and n != len(images):
        raise ToolkitError(f"-n {n} but the file holds {len(images)} samples: drop -n")
    return len(images)


def _compose_inpaint(pipe, init_file, mask, strength, noise_file, resample, jump, class_, n, seed, out, backend,
                     sharded, scale, quiet) -> None:
    """compose --init images --mask M: RePaint inpainting with the pipeline's sampler and guidance (torch)."""
    from toolkit import editing, inpainting
    from toolkit.images import save_stream

    if init_file is None:
        raise ToolkitError("--mask needs --init (the images to inpaint)")
    if strength is not None or noise_file is not None:
        raise ToolkitError("--mask inpaints from pure noise: drop --strength and --noise")
    if backend == "onnxruntime" or sharded:
        raise ToolkitError("--init with --mask samples with the torch backend into one file: drop --backend "
                           "onnxruntime (export with --task inpaint and use --onnx), and a sharded --out")
    resample = DEFAULT_RESAMPLE if resample is None else resample
    jump = DEFAULT_JUMP if jump is None else jump
    x = editing.load_images(init_file, pipe.output_shape, "--init")
    n = _edit_count(n, x)
    m = inpainting.load_mask(mask, pipe.output_shape, n)
    labels, nrow = parse_classes(class_, n, pipe.num_classes)
    if pipe.guidance is not None and labels is None:
        raise ToolkitError(f"--guidance {pipe.guidance.name} needs --class (a label, a comma list or 'all')")
    if nrow is not None:
        raise ToolkitError("--class all takes its own number of samples: give labels (a label or a comma list)")
    run = inpainting.sampler(pipe, resample, jump).plan(pipe.schedule, pipe.steps)
    with progress_bar(-(-n // pipe.batch_size) * len(run), "inpaint", quiet) as bar:
        tick = (lambda k: bar.update(k)) if bar is not None else None
        save_stream(out, (n, *pipe.output_shape), lambda: inpainting.inpaint_batches(
            pipe, x, m, seed, labels, scale=scale, resample=resample, jump=jump, progress=tick))
    click.echo(f"wrote {out} ({n} samples, inpainted with resample {resample} × jump {jump}: {len(run)} iterations = "
               f"{run.nfe} network calls, {pipe.sampler.name} {pipe.steps} steps, torch)")


def _compose_onnx(path, class_, n, seed, batch_size, out, device, scale, threads, init_file=None, mask=None) -> None:
    """compose --onnx FILE: a graph from `toolkit export onnx`, sampled with onnxruntime (an inpainting graph
    with --init and --mask); torch is imported only to read an inpainting run's images."""
    from toolkit.backends import graph_batches, open_session, provider_for
    from toolkit.images import save_stream

    session = open_session(path, provider_for(device), threads)
    known = {}
    if session.inpaints:
        if init_file is None or mask is None:
            raise ToolkitError(f"{path} is an inpainting graph: give --init (the images) and --mask")
        from toolkit import editing, inpainting

        x = editing.load_images(init_file, session.output_shape, "--init")
        n = _edit_count(n, x)
        known = {"image": x, "mask": inpainting.load_mask(mask, session.output_shape, n)}
    elif init_file is not None or mask is not None:
        raise ToolkitError(f"{path} does not inpaint: --init and --mask need a graph from `export onnx --task inpaint`")
    labels, nrow = parse_classes(class_, n, session.num_classes)
    if session.guidance and labels is None:
        raise ToolkitError(f"the graph's {session.guidance} guidance needs --class (a label, a comma list or 'all')")
    if scale is not None and not session.guidance:
        raise ToolkitError("--scale needs a guided graph")
    if labels is not None and nrow is not None:
        n = len(labels)
    if known and nrow is not None:
        raise ToolkitError("--class all takes its own number of samples: give labels (a label or a comma list)")
    save_stream(out, (n, *session.output_shape), lambda: graph_batches(
        session, n, seed=seed, labels=labels, scale=scale, batch_size=batch_size, **known), nrow=nrow)
    meta = session.metadata
    calls = f" = {meta['nfe']} network calls" if meta.get("nfe") else ""  # noqa: E501
    click.echo(f"wrote {out} ({n} samples, {meta['sampler']} {meta['steps']} steps{calls}, {meta['schedule']} schedule, "
               f"onnxruntime {session.provider}, {threads_text(session.threads)})")


@cli.command("merge")
@click.argument("folder", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help=".npy array or .png grid of all samples.")
def merge_cmd(folder, out) -> None:
    """Join the shards of a sharded `compose --out FOLDER/` run into one file, in sample order."""
    from toolkit.images import check_output, save_stream
    from toolkit.shards import merge_batches

    check_output(out)
    hold_output_lock(out)
    shape, batches = merge_batches(folder)
    save_stream(out, shape, batches)
    click.echo(f"wrote {out} ({shape[0]} samples)")
