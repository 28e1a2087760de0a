"""What the commands share: option decorators, option parsing, progress, locks and thread counts."""

from __future__ import annotations

import shlex
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import click

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


def stderr_tty() -> bool:
    return sys.stderr.isatty()


@contextmanager
def progress_bar(length: int, label: str, quiet: bool) -> Iterator:
    """A click progress bar on stderr, or nothing when quiet or not a terminal."""
    if quiet or not stderr_tty():
        yield None
        return
    with click.progressbar(length=length, label=label, file=sys.stderr, show_pos=True,
                           item_show_func=lambda s: s) as bar:
        yield bar

SEED = click.IntRange(0, 2**63 - 1)  # what every seeded command accepts (sample streams mix it as 64 bits)


def rank_prefix() -> str:
    """'rank N: ' in a torchrun process, so a failing rank is named; empty otherwise."""
    import os

    return f"rank {os.environ.get('RANK', '0')}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def hold_output_lock(path) -> None:
    """Hold the output lock of ``path`` until the command ends (a second writer fails at once)."""
    from toolkit.locks import output_lock

    lock = output_lock(path)
    lock.__enter__()
    click.get_current_context().call_on_close(lambda: lock.__exit__(None, None, None))


def os_error(exc: OSError) -> str:
    """One line for an OSError: what could not be done to which path, and the system's reason."""
    import errno

    reason = exc.strerror or str(exc)
    path = exc.filename2 or exc.filename
    if path is None:
        return reason
    writing = exc.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EISDIR, errno.EEXIST, errno.EACCES,
                            errno.EPERM, errno.ENOTDIR)
    return f"cannot {'write' if writing else 'use'} {path}: {reason}"


def dataset_arg(dataset: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
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


def apply_options(options: list):
    """A decorator adding the click options, in order, to a command."""

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def train_options(default_model: str, default_steps: int, lr: float = 1e-3, ema_decay: float = 0.999):
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
        click.option("--schedule-option", "schedule_options", multiple=True, metavar="KEY=VALUE",
                     help="Schedule option (repeatable), e.g. zero_terminal_snr=true (Lin et al. 2024; any schedule)."),
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
        click.option("--log", type=click.Choice(["tensorboard"]), default=None,
                     help="Also write TensorBoard events to OUT.tensorboard/ (the tensorboard extra); "
                     "metrics.jsonl is always written into the checkpoint."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
    ]

    return apply_options(options)


def pipeline_options():
    """The options that compose a pipeline, shared by compose and export onnx."""
    return apply_options([
        click.option("--schedule", default=None, help="Sampling schedule (default: the model's training schedule)."),
        click.option("--sampler", default="ddim", show_default=True),
        click.option("--steps", type=int, default=None, help="Sampling steps S (default: ddim 50, ddpm T)."),
        click.option("--eta", type=float, default=None, help="DDIM η in [0, 1] (0: deterministic)."),
        click.option("--spacing", default=None, help="Timestep spacing: uniform, quadratic, trailing, linspace, logsnr, "
                     "karras, or the times listed (a tuned grid from toolkit tune-grid: 999@991,908@915,...)."),
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
        click.option("--guidance-option", "guidance_option", multiple=True, metavar="KEY=VALUE", expose_value=False,
                     callback=_keep_guidance_options,
                     help="Any other guidance option (repeatable), e.g. rescale=0.7 (cfg: Lin et al.'s CFG rescale φ)."),
    ])


def _keep_guidance_options(ctx: click.Context, param, value) -> None:
    """--guidance-option is read by ``sampler_and_guidance_options`` from the context (every command that composes a
    pipeline gets it without one more parameter)."""
    ctx.meta["guidance_options"] = parse_options(value, "--guidance-option") if value else {}


def backend_options():
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


def threads_text(n: int) -> str:
    return f"{n} thread{'' if n == 1 else 's'}"


def set_threads(threads: int | None) -> int:
    """The thread count both engines use: torch's set here, onnxruntime's passed to its session."""
    import torch

    from toolkit.backends import check_threads

    threads = check_threads(threads)
    torch.set_num_threads(threads)
    return threads


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


def compose_pipeline(schedule, sampler, steps, eta, spacing, variance, sampler_options, num_timesteps, model, guidance,
                     scale, classifier, **extra: Any):
    """The Pipeline the options of ``pipeline_options`` describe (``extra``: device, batch_size, latent)."""
    import toolkit

    options, guidance_options = sampler_and_guidance_options(sampler_options, eta, spacing, variance, guidance,
                                                             scale, classifier)
    return toolkit.compose(schedule=schedule, sampler=sampler, model=model, guidance=guidance, steps=steps,
                           num_timesteps=num_timesteps, guidance_options=guidance_options, **extra, **options)


def sampler_and_guidance_options(sampler_options, eta, spacing, variance, guidance, scale,
                                 classifier) -> tuple[dict[str, Any], dict[str, Any]]:
    """The sampler's options (--sampler-option plus the named ones) and the guidance's, checked together."""
    options = parse_options(sampler_options, "--sampler-option")
    for key, value in (("eta", eta), ("spacing", spacing), ("variance", variance)):
        if value is not None:
            options[key] = value
    ctx = click.get_current_context(silent=True)
    guidance_options: dict[str, Any] = dict(ctx.meta.get("guidance_options", {})) if ctx is not None else {}
    if guidance_options and guidance is None:
        raise ToolkitError("--guidance-option needs --guidance")
    if scale is not None:
        if guidance is None:
            raise ToolkitError("--scale needs --guidance")
        guidance_options["scale"] = scale
    if classifier is not None:
        if guidance != "classifier":
            raise ToolkitError("--classifier needs --guidance classifier")
        guidance_options["classifier"] = classifier
    return options, guidance_options


def float_list(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ToolkitError(f"{what} must be a comma list of numbers, not {text!r}") from None
    if not values:
        raise ToolkitError(f"{what} is empty")
    return values
