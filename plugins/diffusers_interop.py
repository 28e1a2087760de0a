"""Bring your diffusers model: a local diffusers ``UNet2DModel`` folder (with its ``scheduler_config.json``) or a
``DDPMPipeline``/``DDIMPipeline`` folder read as a toolkit checkpoint, the ``diffusers-unet2d`` network (a
``UNet2DModel`` behind the NoisePredictor protocol, trainable with ``toolkit train --model diffusers-unet2d``),
diffusers' beta schedules, and ``toolkit convert`` both ways.

diffusers is an optional extra (``pip install 'diffusion-toolkit[diffusers]'``): this module imports without it
and says so when it is needed. Nothing here touches the network: folders are read with ``local_files_only``
semantics (plain files), and a Hub id is refused with what to do instead.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import types
from pathlib import Path
from typing import Any

import click
import torch
from torch import Tensor, nn

from toolkit.errors import CheckpointError, ToolkitError
from toolkit.files import umask_mode
from toolkit.hookspecs import hookimpl

INSTALL = "pip install 'diffusion-toolkit[diffusers]'"
WEIGHTS = "diffusion_pytorch_model.safetensors"
UNET_CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
PIPELINES = ("DDPMPipeline", "DDIMPipeline")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}  # diffusers → toolkit
FIXED_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")
NULL_LABEL_KEY = "toolkit_null_label"  # in the UNet's config.json: the label index of ∅ (cfg's unconditional label)


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise ToolkitError(f"diffusers models need the diffusers package: {INSTALL}") from None
    return diffusers


# ---------------------------------------------------------------- schedules


def diffusers_betas(num_timesteps: int, beta_schedule: str, beta_start: float, beta_end: float) -> Tensor:
    """β_t exactly as diffusers' DDPMScheduler makes them (float32)."""
    T = num_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if beta_schedule == "scaled_linear":  # latent diffusion's
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine, β capped at 0.999
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float32)
    raise ToolkitError(f"beta_schedule {beta_schedule!r} is not supported; choose from {', '.join(BETA_SCHEDULES)}")


def diffusers_schedule(num_timesteps: int = 1000, beta_schedule: str = "linear", beta_start: float = 1e-4,
                       beta_end: float = 0.02, trained_betas: list[float] | None = None):
    """A diffusers beta schedule, with ᾱ the float32 cumulative product diffusers' schedulers use."""
    from toolkit.schedule import schedule_from_alphas_cumprod

    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise ToolkitError(f"num_train_timesteps must be an integer ≥ 2, got {num_timesteps!r}")
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
        if betas.ndim != 1 or len(betas) != num_timesteps:
            raise ToolkitError(f"trained_betas must hold num_train_timesteps ({num_timesteps}) values")
        name = "diffusers-trained-betas"
    else:
        betas = diffusers_betas(num_timesteps, beta_schedule, float(beta_start), float(beta_end))
        name = f"diffusers-{beta_schedule}"
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise ToolkitError("the schedule's betas must lie in (0, 1)")
    return schedule_from_alphas_cumprod(name, torch.cumprod(1 - betas, 0).double())


# ---------------------------------------------------------------- the network


def _export_safe_upsample(self, hidden_states: Tensor, output_size=None, *args, **kwargs) -> Tensor:
    """diffusers' Upsample2D.forward without its batch-size branches (``if batch >= 64: .contiguous()``, a memory
    layout choice): the same values, and torch.export keeps the batch dimension dynamic."""
    if self.norm is not None:
        hidden_states = self.norm(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    if self.use_conv_transpose:
        return self.conv(hidden_states)
    if self.interpolate:
        hidden_states = (torch.nn.functional.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
                         if output_size is None else
                         torch.nn.functional.interpolate(hidden_states, size=output_size, mode="nearest"))
    if self.use_conv:
        hidden_states = (self.conv if self.name == "conv" else self.Conv2d_0)(hidden_states)
    return hidden_states


def check_unet_config(cfg: dict[str, Any], where: str = "UNet config") -> dict[str, Any]:
    """A UNet2DModel config the toolkit can drive, as plain JSON; an error names the field it cannot map."""
    name = cfg.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise ToolkitError(f"{where}: _class_name is {name!r}; the toolkit loads pixel-space UNet2DModel networks only")
    if cfg.get("time_embedding_type", "positional") != "positional":
        raise ToolkitError(f"{where}: time_embedding_type {cfg['time_embedding_type']!r} is not supported (positional "
                           "embeddings of the DDPM timestep only)")
    if cfg.get("class_embed_type") is not None:
        raise ToolkitError(f"{where}: class_embed_type {cfg['class_embed_type']!r} is not supported (class labels "
                           "through num_class_embeds only)")
    size = cfg.get("sample_size")
    if not (isinstance(size, int) or (isinstance(size, (list, tuple)) and len(size) == 2)):
        raise ToolkitError(f"{where}: sample_size must be an integer or [height, width], got {size!r}")
    return json.loads(json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")}))


class DiffusersUNet(nn.Module):
    """A diffusers UNet2DModel as a NoisePredictor: ``(x_t, t, y) -> unet(x_t, t, class_labels=y).sample``.

    ``unet`` is a full UNet2DModel config (a loaded folder's); without it one is made from the toolkit's options
    (what ``toolkit train --model diffusers-unet2d`` builds). A class-conditional network has num_classes + 1
    class embeddings, the last one the null label ∅.
    """

    def __init__(self, sample_shape: tuple[int, ...] = (1, 8, 8), num_classes: int | None = None,
                 prediction: str = "epsilon", learned_variance: bool = False, unet: dict[str, Any] | None = None,
                 block_out_channels: tuple[int, ...] = (32, 64), layers_per_block: int = 1,
                 attention: tuple[bool, ...] = (False, True), norm_num_groups: int = 8, attention_head_dim: int = 8):
        super().__init__()
        d = _diffusers()
        C, H, W = (int(v) for v in sample_shape)
        out = C * (2 if learned_variance else 1)
        embeds = None if num_classes is None else int(num_classes) + 1
        if unet is None:
            if len(attention) != len(block_out_channels):
                raise ToolkitError("attention needs one flag per entry of block_out_channels")
            unet = {"sample_size": [H, W] if H != W else H, "in_channels": C, "out_channels": out,
                    "block_out_channels": list(block_out_channels), "layers_per_block": int(layers_per_block),
                    "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention],
                    "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
                    "norm_num_groups": int(norm_num_groups), "attention_head_dim": int(attention_head_dim),
                    "num_class_embeds": embeds}
        unet = check_unet_config(dict(unet))
        size = unet["sample_size"]
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if (unet.get("in_channels", 3), *hw) != (C, H, W):
            raise ToolkitError(f"the UNet takes {unet.get('in_channels', 3)}×{hw[0]}×{hw[1]} samples, not {C}×{H}×{W}")
        if unet.get("out_channels", 3) != out:
            raise ToolkitError(f"UNet config: out_channels is {unet.get('out_channels', 3)}, expected {out} "
                               f"({'learned variance: 2 × ' if learned_variance else ''}in_channels)")
        if unet.get("num_class_embeds") != embeds:
            raise ToolkitError(f"UNet config: num_class_embeds is {unet.get('num_class_embeds')}, expected {embeds} "
                               "(the classes and the null label)")
        self.config_dict = unet
        self.unet = d.UNet2DModel.from_config(unet)
        for module in self.unet.modules():  # torch.export must not specialize the batch size
            if type(module).__name__ == "Upsample2D":
                module.forward = types.MethodType(_export_safe_upsample, module)
        self.sample_shape = (C, H, W)
        self.num_classes = None if num_classes is None else int(num_classes)
        if prediction not in ("epsilon", "v", "x0"):
            raise ToolkitError(f"prediction must be epsilon, v or x0, got {prediction!r}")
        self.prediction = prediction
        self.learned_variance = bool(learned_variance)

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        return self.unet(x_t, t, class_labels=y if self.num_classes is not None else None).sample


# ---------------------------------------------------------------- reading a diffusers folder


def _read_json(file: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{what} {str(file)!r} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {str(file)!r} is not a JSON object")
    return data


def locate(path: Path) -> tuple[Path, Path] | None:
    """(the UNet folder, the scheduler config file) of a diffusers folder, or None if it is not one."""
    path = Path(path)
    index = path / "model_index.json"
    if index.is_file():
        info = _read_json(index, "model_index.json")
        name = info.get("_class_name")
        if name not in PIPELINES:
            raise CheckpointError(f"{str(path)!r} holds a {name} (model_index.json); the toolkit loads "
                                  f"{' and '.join(PIPELINES)} folders and UNet2DModel folders")
        return path / "unet", path / "scheduler" / SCHEDULER_CONFIG
    cfg = path / UNET_CONFIG
    if cfg.is_file():
        try:
            data = json.loads(cfg.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        if isinstance(data, dict) and "_class_name" in data and "_diffusers_version" in data:
            return path, path / SCHEDULER_CONFIG
    return None


def toolkit_config(path: Path) -> dict[str, Any]:
    """The toolkit checkpoint config a diffusers folder reads as: the UNet and scheduler configs mapped field by field."""
    from toolkit._version import __version__
    from toolkit.checkpoint import FORMAT, FORMAT_VERSION

    found = locate(path)
    if found is None:
        raise CheckpointError(f"{str(path)!r} is not a diffusers UNet2DModel or pipeline folder")
    unet_dir, sched_file = found
    if not (unet_dir / UNET_CONFIG).is_file():
        raise CheckpointError(f"diffusers folder {str(path)!r} has no {unet_dir.name}/{UNET_CONFIG}")
    if not sched_file.is_file():
        raise CheckpointError(f"diffusers folder {str(path)!r} has no {SCHEDULER_CONFIG} beside the UNet "
                              f"(expected {str(sched_file)!r}): the toolkit needs the training schedule")
    unet = _read_json(unet_dir / UNET_CONFIG, "UNet config")
    sched = _read_json(sched_file, "scheduler config")
    try:
        unet_clean = check_unet_config(unet)
        mapped = map_scheduler(sched)
    except ToolkitError as exc:
        raise CheckpointError(f"diffusers folder {str(path)!r}: {exc}") from None
    C = unet_clean.get("in_channels", 3)
    size = unet_clean["sample_size"]
    H, W = (size, size) if isinstance(size, int) else size
    learned = mapped.pop("learned_variance")
    out = unet_clean.get("out_channels", 3)
    if out != C * (2 if learned else 1):
        raise CheckpointError(f"diffusers folder {str(path)!r}: out_channels {out} does not fit in_channels {C} with "
                              f"variance_type {sched.get('variance_type', 'fixed_small')!r}")
    embeds = unet_clean.get("num_class_embeds")
    num_classes = None
    if embeds is not None:
        null = unet.get(NULL_LABEL_KEY)
        if null != embeds - 1:
            raise CheckpointError(
                f"diffusers folder {str(path)!r}: the UNet has num_class_embeds = {embeds} but does not say which "
                f"label is the null label ∅ (for unconditional samples and cfg): add \"{NULL_LABEL_KEY}\": {embeds - 1} "
                f"to {str(unet_dir / UNET_CONFIG)!r} if the last label is ∅ (trained with label dropout to it); the "
                "toolkit's labels are 0..K-1 with ∅ = K")
        num_classes = embeds - 1
    unet_clean.pop(NULL_LABEL_KEY, None)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": "noise_predictor", "toolkit_version": __version__,
        "model": {"name": "diffusers-unet2d", "options": {
            "sample_shape": [C, H, W], "num_classes": num_classes, "prediction": mapped.pop("prediction"),
            "learned_variance": learned, "unet": unet_clean}},
        "schedule": {"name": "diffusers", "options": mapped.pop("schedule")},
        # sampler defaults the folder implies (a user's --sampler-option wins): x̂_0 clipping, ddpm's fixed variance
        "sampling": {k: v for k, v in (("clip_x0", mapped.pop("clip_x0")), ("variance", mapped.pop("variance")))
                     if v is not None},
        "source": {"format": "diffusers", "path": str(Path(path).resolve()),
                   "diffusers_version": unet.get("_diffusers_version")},
    }


def map_scheduler(sched: dict[str, Any]) -> dict[str, Any]:
    """DDPMScheduler/DDIMScheduler fields → the toolkit's schedule, prediction, learned variance and x̂_0 clipping."""
    def field(key: str, default: Any) -> Any:
        return sched.get(key, default)

    if field("rescale_betas_zero_snr", False):
        raise ToolkitError("rescale_betas_zero_snr = true (a zero-terminal-SNR schedule) is not supported yet")
    if field("thresholding", False):
        raise ToolkitError("thresholding = true (dynamic thresholding of x̂_0) is not supported yet")
    prediction = field("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise ToolkitError(f"prediction_type {prediction!r} is not supported; choose from {', '.join(PREDICTIONS)}")
    variance = field("variance_type", "fixed_small")
    if variance not in (*FIXED_VARIANCES, "learned_range"):
        raise ToolkitError(f"variance_type {variance!r} is not supported (fixed_small, fixed_large or learned_range)")
    clip = bool(field("clip_sample", True))
    if clip and float(field("clip_sample_range", 1.0)) != 1.0:
        raise ToolkitError(f"clip_sample_range {field('clip_sample_range', 1.0)} is not supported (x̂_0 is clipped to "
                           "[-1, 1], the data range)")
    beta_schedule = field("beta_schedule", "linear")
    trained = field("trained_betas", None)
    if trained is None and beta_schedule not in BETA_SCHEDULES:
        raise ToolkitError(f"beta_schedule {beta_schedule!r} is not supported; choose from {', '.join(BETA_SCHEDULES)}")
    schedule = {"num_timesteps": int(field("num_train_timesteps", 1000)), "beta_schedule": beta_schedule,
                "beta_start": float(field("beta_start", 1e-4)), "beta_end": float(field("beta_end", 0.02))}
    if trained is not None:
        schedule["trained_betas"] = [float(b) for b in trained]
    diffusers_schedule(**schedule)  # the betas are valid
    return {"schedule": schedule, "prediction": PREDICTIONS[prediction], "learned_variance": variance == "learned_range",
            "clip_x0": clip, "variance": "beta" if variance.startswith("fixed_large") else None}


class DiffusersFormat:
    """Reads a diffusers folder as a toolkit checkpoint (``toolkit.checkpoint`` asks when config.json is not ours)."""

    name = "diffusers"

    def detect(self, path: Path) -> bool:
        return locate(Path(path)) is not None

    def config(self, path: Path) -> dict[str, Any]:
        return toolkit_config(Path(path))

    def tensors(self, path: Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
        from safetensors.torch import load_file

        unet_dir, _ = locate(Path(path))
        file = unet_dir / WEIGHTS
        if not file.is_file():
            other = [p.name for p in unet_dir.glob("diffusion_pytorch_model*")]
            hint = f" (found {', '.join(other)}: save it with safe_serialization=True)" if other else ""
            raise CheckpointError(f"diffusers folder {str(path)!r} has no {unet_dir.name}/{WEIGHTS}{hint}")
        try:
            state = load_file(str(file), device=str(device))
        except Exception as exc:  # noqa: BLE001 - safetensors' own error types
            raise CheckpointError(f"{str(file)!r} is not a readable safetensors file ({exc})") from None
        return {f"unet.{k}": v for k, v in state.items()}


# ---------------------------------------------------------------- writing one


def scheduler_config(schedule: dict[str, Any], prediction: str, learned_variance: bool, clip_x0: bool) -> dict:
    """A DDPMScheduler config for a toolkit schedule entry (diffusers or a built-in linear/cosine one)."""
    from diffusers import DDPMScheduler

    name, options = schedule["name"], dict(schedule.get("options", {}))
    T = int(options.get("num_timesteps", 1000))
    if name == "diffusers":
        kw = {"beta_schedule": options.get("beta_schedule", "linear"), "beta_start": options.get("beta_start", 1e-4),
              "beta_end": options.get("beta_end", 0.02), "trained_betas": options.get("trained_betas")}
    elif name == "linear" and T == 1000:  # the toolkit's linear scales both ends by 1000/T: only T = 1000 is diffusers'
        kw = {"beta_schedule": "linear", "beta_start": options.get("beta_start", 1e-4),
              "beta_end": options.get("beta_end", 0.02)}
    elif name == "linear":
        from toolkit.checkpoint import build_schedule

        kw = {"trained_betas": [float(b) for b in build_schedule({"schedule": schedule}).betas]}
    elif name == "cosine" and options.get("s", 0.008) == 0.008 and options.get("max_beta", 0.999) == 0.999:
        kw = {"beta_schedule": "squaredcos_cap_v2"}
    else:
        raise ToolkitError(f"schedule {name!r} with options {options} has no diffusers beta_schedule equivalent")
    back = {v: k for k, v in PREDICTIONS.items()}
    sched = DDPMScheduler(num_train_timesteps=T, prediction_type=back[prediction],
                          variance_type="learned_range" if learned_variance else "fixed_small", clip_sample=clip_x0,
                          **{k: v for k, v in kw.items() if v is not None})
    return dict(sched.config)


def to_diffusers(run: str, out: str) -> Path:
    """A toolkit checkpoint of a ``diffusers-unet2d`` network as a DDPMPipeline folder (unet/, scheduler/, README.md)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from toolkit.checkpoint import load_checkpoint

    out_path = Path(out)
    if out_path.exists():
        raise ToolkitError(f"{out!r} exists: give a new folder")
    if not out_path.parent.resolve().is_dir():
        raise ToolkitError(f"output folder {str(out_path.parent)!r} does not exist")
    ckpt = load_checkpoint(run)
    model = ckpt.model
    if not isinstance(model, DiffusersUNet):
        raise ToolkitError(f"checkpoint {run!r} holds a {ckpt.config['model']['name']!r} network, whose architecture "
                           "has no diffusers UNet2DModel equivalent: train with --model diffusers-unet2d to get a "
                           "model that converts (or export it with `toolkit export onnx`)")
    unet_cfg = dict(model.config_dict)
    unet = UNet2DModel.from_config(unet_cfg)
    unet.load_state_dict({k[len("unet."):]: v for k, v in model.state_dict().items()}, strict=True)
    if model.num_classes is not None:
        unet.register_to_config(**{NULL_LABEL_KEY: model.num_classes})
    clip = bool(ckpt.config.get("sampling", {}).get("clip_x0", True))
    sched = DDPMScheduler.from_config(scheduler_config(ckpt.config["schedule"], model.prediction,
                                                      model.learned_variance, clip))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.tmp-", dir=out_path.parent.resolve()))
    try:  # written beside, then renamed: OUT is whole or absent
        DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").write_text(model_card(ckpt, run))
        os.chmod(tmp, umask_mode(0o777))
        os.rename(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_path



def model_card(ckpt, run: str) -> str:
    cfg = ckpt.config
    data = cfg.get("data", {})
    m = ckpt.model
    return "\n".join([
        "---", "library_name: diffusers", "tags: [diffusion-toolkit, ddpm, unconditional-image-generation]", "---", "",
        f"# {Path(run).name}", "",
        "Converted from a diffusion-toolkit checkpoint with `toolkit convert --to diffusers`.", "",
        f"- data: {data.get('name', 'unknown')}, samples of shape {list(m.sample_shape)} in [-1, 1]",
        f"- prediction: {m.prediction}; learned variance: {m.learned_variance}",
        f"- class-conditional: {m.num_classes is not None}" + (
            f" ({m.num_classes} classes; label {m.num_classes} is the null label, `{NULL_LABEL_KEY}`)"
            if m.num_classes is not None else ""),
        f"- training schedule: {cfg['schedule']['name']} {cfg['schedule'].get('options', {})}", "",
        "```python", "from diffusers import DDPMPipeline", "pipe = DDPMPipeline.from_pretrained('PATH')",
        "images = pipe(batch_size=4, num_inference_steps=1000).images", "```", ""])


def from_diffusers(folder: str, out: str) -> Path:
    """A diffusers folder written as a toolkit checkpoint (config.json and model.safetensors)."""
    from toolkit.checkpoint import write_checkpoint

    path = Path(folder)
    if Path(out).exists():
        raise ToolkitError(f"{out!r} exists: give a new folder")
    if locate(path) is None:
        raise ToolkitError(f"{folder!r} is not a diffusers UNet2DModel or pipeline folder")
    fmt = DiffusersFormat()
    config = fmt.config(path)
    tensors = fmt.tensors(path)
    model = DiffusersUNet(**config["model"]["options"])  # the weights fit (strict)
    model.load_state_dict(tensors, strict=True)
    write_checkpoint(out, config, tensors)
    return Path(out)


# ---------------------------------------------------------------- hooks


@hookimpl
def register_models(register):
    register("diffusers-unet2d", DiffusersUNet)


@hookimpl
def register_schedules(register):
    register("diffusers", diffusers_schedule)


@hookimpl
def register_formats(register):
    register("diffusers", DiffusersFormat)


@hookimpl
def register_commands(cli):
    @cli.command("convert")
    @click.argument("source", type=click.Path())
    @click.argument("out", type=click.Path())
    @click.option("--from", "from_", type=click.Choice(["diffusers"]), default=None,
                  help="SOURCE is a diffusers UNet2DModel or DDPMPipeline folder: write a toolkit checkpoint.")
    @click.option("--to", "to", type=click.Choice(["diffusers"]), default=None,
                  help="SOURCE is a toolkit checkpoint of a diffusers-unet2d network: write a DDPMPipeline folder.")
    def convert_cmd(source, out, from_, to) -> None:
        """Convert a model between a toolkit checkpoint and a diffusers folder (needs the diffusers extra)."""
        if (from_ is None) == (to is None):
            raise ToolkitError("give one of --from diffusers or --to diffusers")
        _diffusers()
        path = from_diffusers(source, out) if from_ else to_diffusers(source, out)
        click.echo(f"wrote {path} ({'toolkit checkpoint' if from_ else 'diffusers DDPMPipeline folder'})")
