"""The `toolkit` command: a thin click layer over the Python API."""

from __future__ import annotations

import json
import shlex
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import click

from toolkit import budget
from toolkit.errors import ToolkitError


def parse_options(pairs: tuple[str, ...], what: str) -> dict[str, Any]:
    """KEY=VALUE pairs (VALUE as JSON when it parses, else a string)."""
    from toolkit.registry import option_value

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ToolkitError(f"{what} {pair!r} must look like KEY=VALUE")
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = option_value(value)
    return out


def command_line(ctx: click.Context) -> str:
    """The command as the user gave it (options not left at their defaults), to record in checkpoints."""
    from click.core import ParameterSource

    words = ["toolkit", ctx.info_name or ""]
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or ctx.get_parameter_source(param.name) == ParameterSource.DEFAULT:
            continue
        value, flag = ctx.params[param.name], param.opts[-1] if param.opts[-1].startswith("--") else param.opts[0]
        if param.is_flag:
            words += [flag] if value else []
        elif param.multiple:
            for v in value:
                words += [flag, shlex.quote(str(v))]
        else:
            words += [flag, shlex.quote(str(value))]
    return " ".join(words)


def _stderr_tty() -> bool:
    return sys.stderr.isatty()


@contextmanager
def progress_bar(length: int, label: str, quiet: bool) -> Iterator:
    """A click progress bar on stderr, or nothing when quiet or not a terminal."""
    if quiet or not _stderr_tty():
        yield None
        return
    with click.progressbar(length=length, label=label, file=sys.stderr, show_pos=True,
                           item_show_func=lambda s: s) as bar:
        yield bar


SEED = click.IntRange(0, 2**63 - 1)  # what every seeded command accepts (sample streams mix it as 64 bits)


def _rank_prefix() -> str:
    """'rank N: ' in a torchrun process, so a failing rank is named; empty otherwise."""
    import os

    return f"rank {os.environ.get('RANK', '0')}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def _hold_output_lock(path) -> None:
    """Hold the output lock of ``path`` until the command ends (a second writer fails at once)."""
    from toolkit.locks import output_lock

    lock = output_lock(path)
    lock.__enter__()
    click.get_current_context().call_on_close(lambda: lock.__exit__(None, None, None))


def _os_error(exc: OSError) -> str:
    """One line for an OSError: what could not be done to which path, and the system's reason."""
    import errno

    reason = exc.strerror or str(exc)
    path = exc.filename2 or exc.filename
    if path is None:
        return reason
    writing = exc.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EISDIR, errno.EEXIST, errno.EACCES,
                            errno.EPERM, errno.ENOTDIR)
    return f"cannot {'write' if writing else 'use'} {path}: {reason}"


class ToolkitGroup(click.Group):
    """Turns a user error (ours or click's) into one line on stderr and exit status 2."""

    def main(self, args=None, prog_name=None, **extra):  # type: ignore[override]
        try:
            return super().main(args=args, prog_name=prog_name, standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(130)
        except click.ClickException as exc:  # click's own messages may span lines (a list of choices)
            message = " ".join(line.strip() for line in exc.format_message().splitlines() if line.strip())
            click.echo(f"{_rank_prefix()}error: {message}", err=True)
            sys.exit(2)
        except ToolkitError as exc:
            click.echo(f"{_rank_prefix()}error: {exc}", err=True)
            sys.exit(2)
        except OSError as exc:  # a full disk, a read-only folder, a directory where a file should go...
            click.echo(f"{_rank_prefix()}error: {_os_error(exc)}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - a bug, ours or a plugin's: one line unless asked for more
            import os

            from toolkit.distributed import peer_failure

            if os.environ.get("TOOLKIT_DEBUG", "").strip() not in ("", "0"):
                raise
            text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            if peer_failure(exc):
                click.echo(f"{_rank_prefix()}error: another rank of this run stopped (it died, was killed or hangs), "
                           f"so this rank stops too; see the other ranks' output ({text[:160]})", err=True)
                sys.exit(1)
            click.echo(f"{_rank_prefix()}error: internal error: {type(exc).__name__}"
                       f"{': ' + text if text else ''} (TOOLKIT_DEBUG=1 shows the traceback)", err=True)
            sys.exit(1)


@click.group(cls=ToolkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="diffusion-toolkit", prog_name="toolkit")
def cli() -> None:
    """Denoising diffusion models as composable plugins (DDPM, DDIM, guidance, latent, ONNX)."""
    from toolkit.allocator import tune_allocator

    tune_allocator()  # a sampling or training loop frees and refaults the same buffers every step otherwise


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins_cmd(as_json: bool) -> None:
    """List every registered plugin by kind, and plugins that failed to load."""
    from toolkit.registry import KINDS, get_registry

    reg = get_registry()
    rows = {kind: [{"name": e.name, "aliases": list(e.aliases), "dist": e.dist, "version": e.version,
                    "plugin": e.plugin} for e in sorted(reg.entries[kind], key=lambda e: e.name)]
            for kind in KINDS}
    failed = [{"plugin": f.plugin, "dist": f.dist, "version": f.version, "error": f.error} for f in reg.failures]
    if as_json:
        click.echo(json.dumps({"plugins": rows, "failed": failed}, indent=2))
        return
    for kind in KINDS:
        if not rows[kind]:
            continue
        click.echo(f"{kind}:")
        for r in rows[kind]:
            alias = f" (aliases: {', '.join(r['aliases'])})" if r["aliases"] else ""
            click.echo(f"  {r['name']:<16} {r['dist']} {r['version']}{alias}")
    if failed:
        click.echo("failed:")
        for f in failed:
            click.echo(f"  {f['plugin']:<16} {f['dist']} {f['version']}: {f['error']}")


def _dataset_arg(dataset: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A registered dataset name; else a directory (folder dataset) or a .npy/.npz file (array dataset)."""
    from toolkit.registry import available

    if dataset in available("dataset"):
        return dataset, options
    path = Path(dataset)  # an existing path wins over `dist:name`, so a folder may have ':' in its name
    if path.is_dir():
        return "folder", {"path": str(path.resolve()), **options}
    if path.suffix in (".npy", ".npz") and path.is_file():
        return "array", {"path": str(path.resolve()), **options}
    if path.suffix in (".npy", ".npz") or "/" in dataset:
        raise ToolkitError(f"dataset {dataset!r} does not exist")
    return dataset, options


def _train_options(default_model: str, default_steps: int, lr: float = 1e-3, ema_decay: float = 0.999):
    """Options shared by train, train-classifier and train-features (one training loop behind all)."""
    options = [
        click.option("--dataset", default="digits", show_default=True,
                     help="Dataset plugin name, a folder of images, or a .npy/.npz file."),
        click.option("--data-option", "data_options", multiple=True, metavar="KEY=VALUE",
                     help="Dataset option (repeatable)."),
        click.option("--model", default=default_model, show_default=True, help="Network plugin."),
        click.option("--model-option", "model_options", multiple=True, metavar="KEY=VALUE",
                     help="Architecture option, e.g. base_channels=32 or channel_mult=[1,2]."),
        click.option("--schedule", default="cosine", show_default=True),
        click.option("--num-timesteps", "-T", default=1000, show_default=True, type=int),
        click.option("--steps", default=default_steps, show_default=True, type=int, help="Total optimizer steps."),
        click.option("--batch-size", default=128, show_default=True, type=int),
        click.option("--lr", default=lr, show_default=True, type=float),
        click.option("--weight-decay", default=0.0, show_default=True, type=float),
        click.option("--ema-decay", default=ema_decay, show_default=True, type=float),
        click.option("--grad-clip", default=1.0, show_default=True, type=float),
        click.option("--seed", default=0, show_default=True, type=SEED),
        click.option("--checkpoint-every", default=1000, show_default=True, type=int),
        click.option("--out", required=True, type=click.Path(), help="Checkpoint directory to write."),
        click.option("--resume", is_flag=True, help="Continue from the checkpoint in --out."),
        click.option("--overwrite", is_flag=True, help="Replace an existing --out."),
        click.option("--device", default="cpu", show_default=True, help="cpu or cuda."),
        click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
                     help="Autocast dtype (fp16 with a gradient scaler, CUDA only)."),
        click.option("--compile", "compile_", is_flag=True, help="Run the network through torch.compile."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
    ]

    return _apply(options)


def _apply(options: list):
    """A decorator adding the click options, in order, to a command."""

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def _pipeline_options():
    """The options that compose a pipeline, shared by compose and export onnx."""
    return _apply([
        click.option("--schedule", default=None, help="Sampling schedule (default: the model's training schedule)."),
        click.option("--sampler", default="ddim", show_default=True),
        click.option("--steps", type=int, default=None, help="Sampling steps S (default: ddim 50, ddpm T)."),
        click.option("--eta", type=float, default=None, help="DDIM η in [0, 1] (0: deterministic)."),
        click.option("--spacing", default=None, help="Timestep spacing: uniform, quadratic, trailing, linspace."),
        click.option("--variance", default=None, help="DDPM σ²: posterior (β̃), beta (β), learned, auto."),
        click.option("--sampler-option", "sampler_options", multiple=True, metavar="KEY=VALUE",
                     help="Any other sampler option (repeatable)."),
        click.option("--num-timesteps", "-T", type=int, default=None, help="T of the sampling schedule."),
        click.option("--model", default=None, help="Checkpoint directory or pretrained name (default: digits)."),
        click.option("--guidance", default=None, help="Guidance plugin: cfg (classifier-free) or classifier."),
        click.option("--scale", type=float, default=None,
                     help="Guidance scale: cfg weight w (0: conditional), classifier gradient scale s "
                          "(0: unconditional)."),
        click.option("--classifier", default=None,
                     help="Classifier checkpoint for --guidance classifier (default: shipped)."),
    ])


def _run_training(task: str, dataset, data_options, model, model_options, schedule, num_timesteps, steps,
                  batch_size, lr, weight_decay, ema_decay, grad_clip, seed, checkpoint_every, out, resume,
                  overwrite, device, quiet, precision="fp32", compile_=False, **extra) -> None:
    from toolkit.training import TrainConfig, train

    name, dopts = _dataset_arg(dataset, parse_options(data_options, "--data-option"))
    config = TrainConfig(task=task, dataset=name, dataset_options=dopts, model=model,
                         model_options=parse_options(model_options, "--model-option"), schedule=schedule,
                         num_timesteps=num_timesteps, steps=steps, batch_size=batch_size, lr=lr,
                         weight_decay=weight_decay, ema_decay=ema_decay, grad_clip=grad_clip, seed=seed,
                         checkpoint_every=checkpoint_every, **extra)
    command = command_line(click.get_current_context())
    with progress_bar(steps, "train", quiet) as bar:
        last = [0]

        def progress(done: int, loss: float, rate: float) -> None:
            if bar is not None:
                bar.update(done - last[0] if last[0] else done, current_item=f"loss {loss:.4f}  {rate:.1f} steps/s")
                last[0] = done

        result = train(config, out, resume=resume, overwrite=overwrite, device=device, quiet=quiet,
                       command=command, progress=progress, precision=precision, compile=compile_)
    from toolkit.distributed import shutdown, world_from_env

    shutdown()  # this process owns the group train() joined under torchrun: leave it cleanly
    if not world_from_env().main:
        return
    click.echo(f"wrote {result.path} (step {result.step}, loss {result.loss:.4f}, "
               f"{result.steps_per_second:.1f} steps/s)")


@cli.command("train")
@_train_options("unet", 4000)
@click.option("--prediction", type=click.Choice(["epsilon", "v", "x0"]), default="epsilon", show_default=True)
@click.option("--loss", type=click.Choice(["simple", "hybrid"]), default="simple", show_default=True,
              help="L_simple (Ho et al.) or L_hybrid = L_simple + 0.001·L_vlb (Nichol & Dhariwal).")
@click.option("--learn-variance", is_flag=True, help="Output Σ_θ too (Improved DDPM's learned range).")
@click.option("--unconditional", is_flag=True, help="Ignore the dataset's labels.")
@click.option("--p-uncond", default=0.1, show_default=True, type=float,
              help="Probability of replacing the label by the null label ∅ (classifier-free guidance).")
@click.option("--latent", default=None, help="Autoencoder checkpoint: train on its latents (latent diffusion).")
def train_cmd(prediction, loss, learn_variance, unconditional, p_uncond, latent, **kwargs) -> None:
    """Train a noise predictor with L_simple (Algorithm 1) or L_hybrid into a checkpoint directory."""
    _run_training("noise_predictor", prediction=prediction, loss=loss, learned_variance=learn_variance,
                  conditional=False if unconditional else None, p_uncond=p_uncond, latent=_latent_arg(latent),
                  **kwargs)


def _latent_arg(latent: str | None) -> str | None:
    """An autoencoder directory as an absolute path (the checkpoint must find it again), or a shipped name."""
    if latent is None:
        return None
    from toolkit.registry import available

    if "/" not in latent and latent in available("pretrained"):
        return latent  # a shipped name stays a name, so the checkpoint works on any machine
    return str(Path(latent).resolve()) if Path(latent).exists() else latent


@cli.command("train-classifier")
@_train_options("unet-encoder", 3000)
@click.option("--latent", default=None, help="Autoencoder checkpoint: classify its latents (for latent models).")
def train_classifier_cmd(latent, **kwargs) -> None:
    """Train a noise-aware classifier p_φ(y | x_t, t) on data noised at random t (for classifier guidance)."""
    _run_training("classifier", latent=_latent_arg(latent), **kwargs)


@cli.command("train-autoencoder")
@_train_options("autoencoder", 3000, ema_decay=0.99)
@click.option("--latent-channels", default=2, show_default=True, type=int, help="Channels C of the latent.")
@click.option("--downsample", default=2, show_default=True, type=int, help="Spatial factor F (a power of two).")
@click.option("--kl-weight", default=1e-6, show_default=True, type=float,
              help="Weight of KL(q(z|x) ‖ N(0, I)) (0: a plain autoencoder).")
def train_autoencoder_cmd(latent_channels, downsample, kl_weight, model_options, **kwargs) -> None:
    """Train the autoencoder of latent diffusion; records the latent scale factor and a fingerprint."""
    options = (f"latent_channels={latent_channels}", f"downsample={downsample}", f"kl_weight={kl_weight}")
    _run_training("autoencoder", model_options=(*options, *model_options), **kwargs)


@cli.command("train-features")
@_train_options("cnn", 1000, lr=2e-3, ema_decay=0.99)
@click.option("--holdout", default=0.1, show_default=True, type=float,
              help="Fraction of the data kept out of training to report the accuracy on.")
def train_features_cmd(holdout, **kwargs) -> None:
    """Train the feature network of `evaluate --metric fid`: a classifier on the clean data set."""
    _run_training("features", holdout=holdout, **kwargs)


def parse_classes(text: str | None, n: int, num_classes: int | None) -> tuple[list[int] | None, int | None]:
    """--class: one label, a comma list (cycled), or 'all' (one grid row per class). Returns labels, nrow."""
    if text is None:
        return None, None
    if num_classes is None:
        raise ToolkitError("--class given but the model is unconditional")
    if text.strip().lower() == "all":
        per = max(1, n // num_classes)
        return [k for k in range(num_classes) for _ in range(per)], per
    try:
        labels = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ToolkitError(f"--class must be a label, a comma list of labels or 'all', not {text!r}") from None
    if not labels:
        raise ToolkitError("--class is empty")
    for k in labels:
        if not 0 <= k < num_classes:
            raise ToolkitError(f"--class {k} is out of range: this model has classes 0..{num_classes - 1}")
    return labels, None


def sampler_and_guidance_options(sampler_options, eta, spacing, variance, guidance, scale,
                                 classifier) -> tuple[dict[str, Any], dict[str, Any]]:
    """The sampler's options (--sampler-option plus the named ones) and the guidance's, checked together."""
    options = parse_options(sampler_options, "--sampler-option")
    for key, value in (("eta", eta), ("spacing", spacing), ("variance", variance)):
        if value is not None:
            options[key] = value
    guidance_options: dict[str, Any] = {}
    if scale is not None:
        if guidance is None:
            raise ToolkitError("--scale needs --guidance")
        guidance_options["scale"] = scale
    if classifier is not None:
        if guidance != "classifier":
            raise ToolkitError("--classifier needs --guidance classifier")
        guidance_options["classifier"] = classifier
    return options, guidance_options


def _backend_options():
    """--backend and --threads, shared by compose and evaluate."""
    options = [
        click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime"]), default="auto", show_default=True,
                     envvar="TOOLKIT_BACKEND", help="auto: onnxruntime through the pipeline's exported graph (cached, "
                     "checked against torch) where it exports, else torch; the result line says which ran."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="CPU threads for torch and onnxruntime [default: OMP_NUM_THREADS, else the cores "
                     "available to this process]."),
    ]

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def _threads(n: int) -> str:
    return f"{n} thread{'' if n == 1 else 's'}"


def _set_threads(threads: int | None) -> int:
    """The thread count both engines use: torch's set here, onnxruntime's passed to its session."""
    import torch

    from toolkit.backends import check_threads

    threads = check_threads(threads)
    torch.set_num_threads(threads)
    return threads


@cli.command("compose")
@_pipeline_options()
@click.option("--latent", default=None, help="Autoencoder of a latent model (default: the one it records).")
@click.option("--class", "class_", default=None, help="Label, comma list of labels, or 'all'.")
@click.option("-n", "n", default=64, show_default=True, type=int, help="Number of samples.")
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--batch-size", default=500, show_default=True, type=int)
@click.option("--out", default="samples.png", show_default=True, type=click.Path(), help=".png grid or .npy array.")
@click.option("--device", default="cpu", show_default=True)
@_backend_options()
@click.option("--onnx", "onnx_file", default=None, type=click.Path(),
              help="Sample a graph from `toolkit export onnx` with onnxruntime (sampler, steps, guidance from it).")
@click.option("--layout", type=click.Choice(["loop", "unrolled"]), default="loop", show_default=True,
              help="Graph layout when exporting for onnxruntime on the fly.")
@click.option("--quiet", "-q", is_flag=True)
def compose_cmd(schedule, sampler, steps, eta, spacing, variance, sampler_options, num_timesteps, model, latent,
                guidance, scale, classifier, class_, n, seed, batch_size, out, device, backend, threads, onnx_file,
                layout, quiet) -> None:
    """Compose a pipeline from named plugins and sample from it."""
    import toolkit
    from toolkit.distributed import world_from_env
    from toolkit.images import check_output
    from toolkit.shards import is_shard_folder

    world = world_from_env()
    sharded = is_shard_folder(out, world)
    if sharded and backend == "onnxruntime":
        raise ToolkitError("sharded sampling (--out FOLDER/ or torchrun) uses --backend torch")
    threads = _set_threads(threads)
    if not sharded:
        check_output(out)
        _hold_output_lock(out)
    if n < 1:
        raise ToolkitError(f"-n must be positive, got {n}")
    n = budget.samples(n)
    if batch_size < 1:
        raise ToolkitError(f"--batch-size must be positive, got {batch_size}")
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
        _compose_onnx(onnx_file, class_, n, seed, batch_size, out, device, scale, threads)
        return
    options, guidance_options = sampler_and_guidance_options(sampler_options, eta, spacing, variance, guidance,
                                                             scale, classifier)
    pipe = toolkit.compose(schedule=schedule, sampler=sampler, model=model, guidance=guidance, steps=steps,
                           num_timesteps=num_timesteps, device=device, batch_size=batch_size,
                           guidance_options=guidance_options, latent=latent, **options)
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
    click.echo(f"wrote {out} ({n} samples, {pipe.sampler.name} {pipe.steps} steps = {pipe.nfe} network calls, "
               f"{pipe.schedule.name} schedule, {engine.label}{why})")


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

    name, options = _dataset_arg(dataset, parse_options(data_options, "--data-option"))
    data = create("dataset", name, **options)
    path = export_dataset(data, out, fmt)
    click.echo(f"wrote {path} ({len(data)} samples of {data.name}, {fmt})")


@cli.command("merge")
@click.argument("folder", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help=".npy array or .png grid of all samples.")
def merge_cmd(folder, out) -> None:
    """Join the shards of a sharded `compose --out FOLDER/` run into one file, in sample order."""
    from toolkit.images import check_output, save_stream
    from toolkit.shards import merge_batches

    check_output(out)
    _hold_output_lock(out)
    shape, batches = merge_batches(folder)
    save_stream(out, shape, batches)
    click.echo(f"wrote {out} ({shape[0]} samples)")


def _session(path, device: str, threads: int | None = None):
    from toolkit.exporters.runtime import GraphError, SamplerSession

    provider = {"cpu": "cpu", "cuda": "cuda"}.get(str(device).split(":")[0])
    if provider is None:
        raise ToolkitError(f"--device must be cpu or cuda, got {device!r}")
    try:
        return SamplerSession(path, provider=provider, threads=threads)
    except GraphError as exc:
        raise ToolkitError(str(exc)) from exc


def _compose_onnx(path, class_, n, seed, batch_size, out, device, scale, threads) -> None:
    """compose --onnx FILE: a graph from `toolkit export onnx`, sampled with onnxruntime."""
    from toolkit.exporters.onnx import onnx_batches
    from toolkit.images import save_stream

    session = _session(path, device, threads)
    labels, nrow = parse_classes(class_, n, session.num_classes)
    if session.guidance and labels is None:
        raise ToolkitError(f"the graph's {session.guidance} guidance needs --class (a label, a comma list or 'all')")
    if scale is not None and not session.guidance:
        raise ToolkitError("--scale needs a guided graph")
    if labels is not None and nrow is not None:
        n = len(labels)
    save_stream(out, (n, *session.output_shape), lambda: onnx_batches(
        session, n, seed=seed, labels=labels, scale=scale, batch_size=batch_size), nrow=nrow)
    meta = session.metadata
    calls = f" = {meta['nfe']} network calls" if meta.get("nfe") else ""  # noqa: E501
    click.echo(f"wrote {out} ({n} samples, {meta['sampler']} {meta['steps']} steps{calls}, {meta['schedule']} schedule, "
               f"onnxruntime {session.provider}, {_threads(session.threads)})")


@cli.group("export")
def export_group() -> None:
    """Export a model or a whole sampler for other runtimes."""


@export_group.command("onnx")
@click.option("--component", type=click.Choice(["sampler", "predictor"]), default="sampler", show_default=True,
              help="sampler: the whole sampling run as one graph; predictor: the network ε_θ(x, t, y) alone.")
@_pipeline_options()
@click.option("--layout", type=click.Choice(["loop", "unrolled"]), default="loop", show_default=True,
              help="An ONNX Loop over one step (small, loads fast) or every step unrolled.")
@click.option("--noise", "noise_mode", type=click.Choice(["seed", "inputs"]), default="seed", show_default=True,
              help="seed: inputs seed and index, the graph makes its own noise (the same samples as "
                   "`compose --seed` everywhere); inputs: the app feeds x_T (and noise).")
@click.option("--out", required=True, type=click.Path(), help="The .onnx file to write (and its metadata as "
              "FILE.json).")
def export_onnx_cmd(model, component, schedule, sampler, steps, eta, spacing, variance, sampler_options,
                    num_timesteps, guidance, scale, classifier, layout, noise_mode, out) -> None:
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
    _hold_output_lock(out)
    options, guidance_options = sampler_and_guidance_options(sampler_options, eta, spacing, variance, guidance,
                                                             scale, classifier)
    t0 = time.perf_counter()
    if component == "predictor":
        if guidance is not None or options or steps is not None:
            raise ToolkitError("--component predictor exports the network alone: drop the sampler and guidance options")
        from toolkit.checkpoint import load_checkpoint

        ckpt = load_checkpoint(model or "digits")
        if ckpt.kind != "noise_predictor":
            raise ToolkitError(f"checkpoint {str(ckpt.path)!r} holds a {ckpt.kind} checkpoint, not a noise predictor")
        path = exporter.export_predictor(ckpt.model, out, config=ckpt.config)
    else:
        pipe = toolkit.compose(schedule=schedule, sampler=sampler, model=model, guidance=guidance, steps=steps,
                               num_timesteps=num_timesteps, guidance_options=guidance_options, **options)
        path = exporter.export_sampler(pipe, out, layout=layout, noise=noise_mode)
    size = Path(path).stat().st_size
    click.echo(f"wrote {path} ({size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s)")


def _float_list(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ToolkitError(f"{what} must be a comma list of numbers, not {text!r}") from None
    if not values:
        raise ToolkitError(f"{what} is empty")
    return values


@cli.command("evaluate")
@click.option("--model", default=None, help="Checkpoint directory or pretrained name (default: digits).")
@click.option("--metric", type=click.Choice(["nll", "fid", "ode"]), required=True,
              help="nll: the variational bound in bits/dim; fid: a sample-quality sweep; ode: each deterministic "
                   "sampler's distance to a 1000-NFE solution of the probability-flow ODE from the same x_T.")
@click.option("--dataset", default=None, help="Data to evaluate against (default: the model's training data).")
@click.option("--data-option", "data_options", multiple=True, metavar="KEY=VALUE", help="Dataset option.")
@click.option("--limit", type=int, default=None, help="nll: evaluate the first N data points only.")
@click.option("--variance", default="auto", show_default=True,
              help="nll: Σ of the reverse steps: auto (learned if the model has it, else β̃), posterior, beta, learned.")
@click.option("--sampler", "samplers", default="ddim", show_default=True,
              help="fid/ode: sampler(s), comma list, each with its own options: ddim,dpmpp-2m:order=1:spacing=karras")
@click.option("--steps", default="10,20,50,100", show_default=True, help="fid: comma list of step counts.")
@click.option("--eta", default=None, help="fid: comma list of DDIM η (one line each).")
@click.option("--sampler-option", "sampler_options", multiple=True, metavar="KEY=VALUE",
              help="fid/ode: option for every sampler that takes it, e.g. clip_x0=false (repeatable).")
@click.option("--guidance", default=None, help="fid: guidance plugin (cfg or classifier).")
@click.option("--scale", type=float, default=None, help="fid: guidance scale.")
@click.option("--classifier", default=None, help="fid: classifier checkpoint for --guidance classifier.")
@click.option("--features", default=None,
              help="fid: feature network checkpoint (toolkit train-features), or 'raw' (default: shipped for digits).")
@click.option("--unconditional", is_flag=True, help="fid: sample a class-conditional model from the null label.")
@click.option("-n", "n", default=None, type=int, help="fid/ode: samples per row (default fid 1000, ode 100).")
@click.option("--plot", default=None, type=click.Path(), help="fid: write a PNG of quality against steps.")
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--batch-size", default=500, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--out", default=None, type=click.Path(), help="Also write the JSON to this file.")
@click.option("--device", default="cpu", show_default=True)
@_backend_options()
@click.option("--quiet", "-q", is_flag=True)
def evaluate_cmd(model, metric, dataset, data_options, limit, variance, samplers, steps, eta, sampler_options,
                 guidance, scale, classifier, features, unconditional, n, plot, seed, batch_size, as_json, out,
                 device, backend, threads, quiet) -> None:
    """Evaluate a model: the bound in bits/dim (nll), or sample quality over samplers and steps (fid)."""
    from attrs import asdict

    from toolkit import evaluate
    from toolkit.files import atomic_write

    if out is not None and (Path(out).suffix != ".json" or not Path(out).parent.resolve().is_dir()):
        raise ToolkitError(f"--out must be a .json file in an existing folder, got {out!r}")
    if plot is not None and (Path(plot).suffix != ".png" or not Path(plot).parent.resolve().is_dir()):
        raise ToolkitError(f"--plot must be a .png file in an existing folder, got {plot!r}")
    if plot is not None and metric == "nll":
        raise ToolkitError("--plot applies to --metric fid and ode")
    ds_options = parse_options(data_options, "--data-option")
    name = None
    if dataset is not None:
        name, ds_options = _dataset_arg(dataset, ds_options)
    threads = _set_threads(threads)
    if metric != "fid" and backend == "onnxruntime":
        raise ToolkitError(f"--metric {metric} runs in torch (it needs the network's outputs at every step): "
                           "--backend onnxruntime applies to --metric fid")
    if metric == "nll":
        from toolkit.checkpoint import resolve_checkpoint

        path = resolve_checkpoint(model or "digits")
        if batch_size < 1:
            raise ToolkitError(f"--batch-size must be positive, got {batch_size}")
        with progress_bar(1, "nll", quiet) as bar:  # one tick per network call; length set once known

            def tick(k: int) -> None:
                if bar is not None:
                    bar.update(k)

            result = evaluate.nll(path, dataset=name, dataset_options=ds_options, limit=budget.points(limit),
                                  batch_size=batch_size, variance=variance, seed=seed, device=device,
                                  progress=tick, on_start=(lambda total: setattr(bar, "length", total))
                                  if bar is not None else None)
        payload = {"metric": "nll", "model": str(path), **result.to_json()}
        table = [f"bound on -log p(x_0), {result.n} points, variance {result.variance}, "
                 f"conditioning: {result.conditioning}",
                 f"  L_T (prior)        {result.prior:10.4f} bits/dim",
                 f"  sum L_t-1 (t>=2)   {result.diffusion:10.4f} bits/dim",
                 f"  L_0 (decoder)      {result.decoder:10.4f} bits/dim",
                 f"  total              {result.bits_per_dim:10.4f} ± {result.stderr:.4f} bits/dim"]
    else:
        grid = evaluate.sampler_grid([s.strip() for s in samplers.split(",") if s.strip()],
                                     _float_list(eta, "--eta"), parse_options(sampler_options, "--sampler-option"))
        step_list = []
        for v in _float_list(steps, "--steps") or []:
            if not v.is_integer() or v < 1:
                raise ToolkitError(f"--steps must be whole numbers ≥ 1, got {v:g}")
            step_list.append(int(v))
        _, guidance_options = sampler_and_guidance_options((), None, None, None, guidance, scale, classifier)
        n = budget.samples(n if n is not None else (1000 if metric == "fid" else 100))
        if batch_size < 1:
            raise ToolkitError(f"--batch-size must be positive, got {batch_size}")
        with progress_bar(1, "sample", quiet) as bar:
            kw = dict(n=n, seed=seed, guidance=guidance, guidance_options=guidance_options,
                      conditional=not unconditional, batch_size=batch_size, device=device,
                      progress=(lambda k: bar.update(k)) if bar is not None else None,
                      on_start=(lambda total: setattr(bar, "length", total)) if bar is not None else None)
            if metric == "fid":
                report = evaluate.sample_quality(model, grid, step_list, features=features, dataset=name,
                                                 dataset_options=ds_options, backend=backend, threads=threads, **kw)
                rows = report.rows
            else:
                rows = evaluate.ode_errors(model, grid, step_list, **kw)
        if metric == "fid":
            payload = {"metric": "fid", "model": model or "digits", "guidance": guidance, **guidance_options,
                       **report.to_json()}
            if plot is not None:
                evaluate.plot_quality(report, plot)
            engines = sorted({r.backend for r in rows})
            table = [f"{report.dataset}: Fréchet distance in {report.features} features, n={report.n}; FD is biased "
                     f"upward at small n: {report.n} real samples of the data set itself score "
                     f"{report.reference_fd:.3f} here, so compare rows of the same n (n ≥ 1000 for conclusions)",
                     f"{'sampler':<28} {'steps':>6} {'NFE':>5} {'FD':>9} {'accuracy':>9} {'entropy':>8} {'samples/s':>10}"]
            for r in rows:
                acc = f"{r.accuracy:.3f}" if r.accuracy is not None else "-"
                ent = f"{r.class_entropy:.3f}" if r.class_entropy is not None else "-"
                table.append(f"{r.label:<28} {r.steps:>6} {r.nfe:>5} {r.fd:>9.3f} {acc:>9} {ent:>8} "
                             f"{r.samples_per_s:>10.1f}")
            table.append(f"sampled with {' and '.join(engines)}")
        else:
            payload = {"metric": "ode", "model": model or "digits", "guidance": guidance, **guidance_options,
                       "n": n, "seed": seed, "reference_nfe": evaluate.REFERENCE_NFE,
                       "rows": [{**asdict(r), "label": r.label} for r in rows]}
            if plot is not None:
                evaluate.plot_quality(evaluate.QualityReport(rows, float("nan"), "-", None, "-", n, seed), plot,
                                      metric="ode_error")
            table = [f"distance to a {evaluate.REFERENCE_NFE}-NFE solution of the probability-flow ODE from the same "
                     f"x_T (RMS per sample, n={n})",
                     f"{'sampler':<28} {'steps':>6} {'NFE':>5} {'ODE error':>10} {'samples/s':>10}"]
            for r in rows:
                err = f"{r.ode_error:.5f}" if r.ode_error is not None else "stochastic"
                table.append(f"{r.label:<28} {r.steps:>6} {r.nfe:>5} {err:>10} {r.samples_per_s:>10.1f}")
        if plot is not None:
            table.append(f"wrote {plot}")
    click.echo(json.dumps(payload, indent=2) if as_json else "\n".join(table))
    if out is not None:
        text = json.dumps(payload, indent=2)
        atomic_write(Path(out), lambda tmp: Path(tmp).write_text(text))


def main() -> None:
    cli(prog_name="toolkit")
