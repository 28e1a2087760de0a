"""`toolkit train`, `train-classifier`, `train-autoencoder`, `train-features`: one training loop behind all."""

from __future__ import annotations

from pathlib import Path

import click

from toolkit.cli.base import cli
from toolkit.cli.common import command_line, dataset_arg, parse_options, progress_bar, train_options


def run_training(task: str, dataset, data_options, model, model_options, schedule, schedule_options, num_timesteps,
                 steps, batch_size, lr, weight_decay, ema_decay, grad_clip, seed, checkpoint_every, out, resume,
                 overwrite, device, quiet, precision="fp32", compile_=False, log=None, **extra) -> None:
    from toolkit.training import TrainConfig, train

    name, dopts = dataset_arg(dataset, parse_options(data_options, "--data-option"))
    config = TrainConfig(task=task, dataset=name, dataset_options=dopts, model=model,
                         model_options=parse_options(model_options, "--model-option"), schedule=schedule,
                         schedule_options=parse_options(schedule_options, "--schedule-option"),
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
                       command=command, progress=progress, precision=precision, compile=compile_, log=log)
    from toolkit.distributed import shutdown, world_from_env

    shutdown()  # this process owns the group train() joined under torchrun: leave it cleanly
    if not world_from_env().main:
        return
    click.echo(f"wrote {result.path} (step {result.step}, loss {result.loss:.4f}, "
               f"{result.steps_per_second:.1f} steps/s)")


@cli.command("train")
@train_options("unet", 4000)
@click.option("--prediction", type=click.Choice(["epsilon", "v", "x0"]), default=None,
              help="What the network predicts [default: v for --latent and zero-terminal-SNR schedules (Salimans & Ho; "
                   "Lin et al.), epsilon otherwise].")
@click.option("--loss", type=click.Choice(["simple", "hybrid", "vlb"]), default="simple", show_default=True,
              help="L_simple (Ho et al.), L_hybrid = L_simple + 0.001·L_vlb, or L_vlb alone (Nichol & Dhariwal; "
                   "hybrid and vlb need --learn-variance).")
@click.option("--importance-sampling", is_flag=True,
              help="Draw t ∝ √E[L_t²] (10 values of L_t per t, uniform until every t has them; Improved DDPM §3.3); "
                   "for --loss vlb and hybrid.")
@click.option("--learn-variance", is_flag=True, help="Output Σ_θ too (Improved DDPM's learned range).")
@click.option("--unconditional", is_flag=True, help="Ignore the dataset's labels.")
@click.option("--p-uncond", default=0.1, show_default=True, type=float,
              help="Probability of replacing the label by the null label ∅ (classifier-free guidance).")
@click.option("--latent", default=None, help="Autoencoder checkpoint: train on its latents (latent diffusion).")
@click.option("--sample-every", default=0, show_default=True, type=click.IntRange(min=0),
              help="Steps between preview grids (a scatter plot for 2-D data) saved in the checkpoint; 0: none.")
@click.option("--val-fraction", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Data kept out of training; its loss is logged at every checkpoint.")
@click.option("--task", default="noise_predictor", show_default=True,
              help="The training task: a registered task plugin (`toolkit plugins`) that trains a noise predictor.")
def train_cmd(prediction, loss, importance_sampling, learn_variance, unconditional, p_uncond, latent, sample_every,
              val_fraction, task, **kwargs) -> None:
    """Train a noise predictor with L_simple (Algorithm 1), L_hybrid or L_vlb into a checkpoint directory."""
    run_training(task, prediction=prediction, loss=loss, importance_sampling=importance_sampling,
                 learned_variance=learn_variance,
                 conditional=False if unconditional else None, p_uncond=p_uncond, latent=latent_arg(latent),
                 sample_every=sample_every, holdout=val_fraction, **kwargs)


def latent_arg(latent: str | None) -> str | None:
    """An autoencoder directory as an absolute path (the checkpoint must find it again), or a shipped name."""
    if latent is None:
        return None
    from toolkit.registry import available

    if "/" not in latent and latent in available("pretrained"):
        return latent  # a shipped name stays a name, so the checkpoint works on any machine
    return str(Path(latent).resolve()) if Path(latent).exists() else latent


@cli.command("train-classifier")
@train_options("unet-encoder", 3000)
@click.option("--latent", default=None, help="Autoencoder checkpoint: classify its latents (for latent models).")
def train_classifier_cmd(latent, **kwargs) -> None:
    """Train a noise-aware classifier p_φ(y | x_t, t) on data noised at random t (for classifier guidance)."""
    run_training("classifier", latent=latent_arg(latent), **kwargs)


@cli.command("train-autoencoder")
@train_options("autoencoder", 3000, ema_decay=0.99)
@click.option("--latent-channels", default=2, show_default=True, type=int, help="Channels C of the latent.")
@click.option("--downsample", default=2, show_default=True, type=int, help="Spatial factor F (a power of two).")
@click.option("--kl-weight", default=1e-6, show_default=True, type=float,
              help="Weight of KL(q(z|x) ‖ N(0, I)) (0: a plain autoencoder).")
def train_autoencoder_cmd(latent_channels, downsample, kl_weight, model_options, **kwargs) -> None:
    """Train the autoencoder of latent diffusion; records the latent scale factor and a fingerprint."""
    options = (f"latent_channels={latent_channels}", f"downsample={downsample}", f"kl_weight={kl_weight}")
    run_training("autoencoder", model_options=(*options, *model_options), **kwargs)


@cli.command("train-features")
@train_options("cnn", 1000, lr=2e-3, ema_decay=0.99)
@click.option("--holdout", default=0.1, show_default=True, type=float,
              help="Fraction of the data kept out of training to report the accuracy on.")
def train_features_cmd(holdout, **kwargs) -> None:
    """Train the feature network of `evaluate --metric fid`: a classifier on the clean data set."""
    run_training("features", holdout=holdout, **kwargs)
