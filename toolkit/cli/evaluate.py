"""`toolkit evaluate`: the bound in bits/dim, sample quality over samplers and steps, the ODE error."""

from __future__ import annotations

import json
from pathlib import Path

import click

from toolkit import budget
from toolkit.cli.base import cli
from toolkit.cli.common import (SEED, backend_options, dataset_arg, float_list, parse_options, progress_bar,
                               sampler_and_guidance_options, set_threads)
from toolkit.errors import ToolkitError


@cli.command("evaluate")
@click.option("--model", default=None, help="Checkpoint directory or pretrained name (default: digits).")
@click.option("--metric", type=click.Choice(["nll", "ode-nll", "fid", "ode"]), required=True,
              help="nll: the variational bound in bits/dim; ode-nll: the exact likelihood of the probability-flow ODE "
                   "in bits/dim, beside the bound; fid: a sample-quality sweep; ode: each deterministic "
                   "sampler's distance to a 1000-NFE solution of the probability-flow ODE from the same x_T.")
@click.option("--dataset", default=None, help="Data to evaluate against (default: the model's training data).")
@click.option("--data-option", "data_options", multiple=True, metavar="KEY=VALUE", help="Dataset option.")
@click.option("--limit", type=int, default=None,
              help="nll, ode-nll: evaluate the first N data points only [ode-nll default: 100].")
@click.option("--trace", type=click.Choice(["hutchinson", "exact"]), default="hutchinson", show_default=True,
              help="ode-nll: the divergence by Hutchinson's estimator (one Rademacher probe) or exactly (d backward "
                   "passes; fine for 8×8 digits).")
@click.option("--ode-steps", type=int, default=50, show_default=True,
              help="ode-nll: fourth-order Runge-Kutta steps (4 network calls each).")
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
@backend_options()
@click.option("--quiet", "-q", is_flag=True)
def evaluate_cmd(model, metric, dataset, data_options, limit, trace, ode_steps, variance, samplers, steps, eta,
                 sampler_options, guidance, scale, classifier, features, unconditional, n, plot, seed, batch_size,
                 as_json, out, device, backend, threads, quiet) -> None:
    """Evaluate a model: the bound in bits/dim (nll), or sample quality over samplers and steps (fid)."""
    from toolkit import evaluate
    from toolkit.files import atomic_write

    if out is not None and (Path(out).suffix != ".json" or not Path(out).parent.resolve().is_dir()):
        raise ToolkitError(f"--out must be a .json file in an existing folder, got {out!r}")
    if plot is not None and (Path(plot).suffix != ".png" or not Path(plot).parent.resolve().is_dir()):
        raise ToolkitError(f"--plot must be a .png file in an existing folder, got {plot!r}")
    if plot is not None and metric in ("nll", "ode-nll"):
        raise ToolkitError("--plot applies to --metric fid and ode")
    if ode_steps < 1:
        raise ToolkitError(f"--ode-steps must be positive, got {ode_steps}")
    if batch_size < 1:
        raise ToolkitError(f"--batch-size must be positive, got {batch_size}")
    ds_options = parse_options(data_options, "--data-option")
    name = None
    if dataset is not None:
        name, ds_options = dataset_arg(dataset, ds_options)
    threads = set_threads(threads)
    if metric != "fid" and backend == "onnxruntime":
        raise ToolkitError(f"--metric {metric} runs in torch (it needs the network's outputs at every step): "
                           "--backend onnxruntime applies to --metric fid")
    if metric == "nll":
        payload, table = _nll(model, name, ds_options, limit, batch_size, variance, seed, device, quiet)
    elif metric == "ode-nll":
        payload, table = _ode_nll(model, name, ds_options, 100 if limit is None else limit, min(batch_size, 100),
                                  trace, ode_steps, variance, seed, device, quiet)
    else:
        grid = evaluate.sampler_grid(evaluate.split_samplers(samplers),
                                     float_list(eta, "--eta"), parse_options(sampler_options, "--sampler-option"))
        step_list = []
        for v in float_list(steps, "--steps") or []:
            if not v.is_integer() or v < 1:
                raise ToolkitError(f"--steps must be whole numbers ≥ 1, got {v:g}")
            step_list.append(int(v))
        _, guidance_options = sampler_and_guidance_options((), None, None, None, guidance, scale, classifier)
        n = budget.samples(n if n is not None else (1000 if metric == "fid" else 100))
        with progress_bar(1, "sample", quiet) as bar:
            kw = dict(n=n, seed=seed, guidance=guidance, guidance_options=guidance_options,
                      conditional=not unconditional, batch_size=batch_size, device=device,
                      progress=(lambda k: bar.update(k)) if bar is not None else None,
                      on_start=(lambda total: setattr(bar, "length", total)) if bar is not None else None)
            head = {"model": model or "digits", "guidance": guidance, **guidance_options}
            if metric == "fid":
                report = evaluate.sample_quality(model, grid, step_list, features=features, dataset=name,
                                                 dataset_options=ds_options, backend=backend, threads=threads, **kw)
                payload, table = _fid_table(report, head, plot)
            else:
                payload, table = _ode_table(evaluate.ode_errors(model, grid, step_list, **kw), head, n, seed, plot)
        if plot is not None:
            table.append(f"wrote {plot}")
    click.echo(json.dumps(payload, indent=2) if as_json else "\n".join(table))
    if out is not None:
        text = json.dumps(payload, indent=2)
        atomic_write(Path(out), lambda tmp: Path(tmp).write_text(text))


def _nll(model, dataset, ds_options, limit, batch_size, variance, seed, device, quiet) -> tuple[dict, list[str]]:
    """--metric nll: the bound on −log p(x_0) and its terms."""
    from toolkit import evaluate
    from toolkit.checkpoint import resolve_checkpoint

    path = resolve_checkpoint(model or "digits")
    with progress_bar(1, "nll", quiet) as bar:  # one tick per network call; length set once known

        def tick(k: int) -> None:
            if bar is not None:
                bar.update(k)

        result = evaluate.nll(path, dataset=dataset, dataset_options=ds_options, limit=budget.points(limit),
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
    return payload, table


def _ode_nll(model, dataset, ds_options, limit, batch_size, trace, ode_steps, variance, seed, device,
             quiet) -> tuple[dict, list[str]]:
    """--metric ode-nll: the probability-flow ODE likelihood, and the variational bound on the same points."""
    from toolkit.likelihood import ode_nll

    bound_payload, _ = _nll(model, dataset, ds_options, limit, batch_size, variance, seed, device, True)
    path = bound_payload["model"]
    with progress_bar(1, "ode-nll", quiet) as bar:
        result = ode_nll(path, dataset=dataset, dataset_options=ds_options, limit=budget.points(limit),
                         batch_size=batch_size, steps=ode_steps, trace=trace, seed=seed, device=device,
                         progress=(lambda k: bar.update(k)) if bar is not None else None,
                         on_start=(lambda total: setattr(bar, "length", total)) if bar is not None else None)
    payload = {"metric": "ode-nll", "model": path, **result.to_json(),
               "bound_bits_per_dim": bound_payload["bits_per_dim"], "bound_stderr": bound_payload["stderr"]}
    deq = f", dequantized ({result.levels} levels)" if result.levels is not None else ""
    table = [f"-log p(x_0), {result.n} points, conditioning: {result.conditioning}{deq}",
             f"  probability-flow ODE  {result.bits_per_dim:10.4f} ± {result.stderr:.4f} bits/dim "
             f"({result.trace} trace, RK4 {result.steps} steps = {result.nfe} network calls, σ̃_max {result.sigma_max:g})",
             f"  variational bound     {bound_payload['bits_per_dim']:10.4f} ± {bound_payload['stderr']:.4f} bits/dim "
             f"(variance {bound_payload['variance']})"]
    return payload, table


def _fid_table(report, head: dict, plot) -> tuple[dict, list[str]]:
    """--metric fid: one row per (sampler, steps), and the engines that sampled them."""
    from toolkit import evaluate

    payload = {"metric": "fid", **head, **report.to_json()}
    if plot is not None:
        evaluate.plot_quality(report, plot)
    table = [f"{report.dataset}: Fréchet distance in {report.features} features, n={report.n}; FD is biased "
             f"upward at small n: {report.n} real samples of the data set itself score "
             f"{report.reference_fd:.3f} here, so compare rows of the same n (n ≥ 1000 for conclusions)",
             f"{'sampler':<28} {'steps':>6} {'NFE':>5} {'FD':>9} {'accuracy':>9} {'entropy':>8} {'samples/s':>10}"]
    for r in report.rows:
        acc = f"{r.accuracy:.3f}" if r.accuracy is not None else "-"
        ent = f"{r.class_entropy:.3f}" if r.class_entropy is not None else "-"
        table.append(f"{r.label:<28} {r.steps:>6} {r.nfe:>5} {r.fd:>9.3f} {acc:>9} {ent:>8} {r.samples_per_s:>10.1f}")
    table.append(f"sampled with {' and '.join(sorted({r.backend for r in report.rows}))}")
    return payload, table


def _ode_table(rows, head: dict, n: int, seed: int, plot) -> tuple[dict, list[str]]:
    """--metric ode: each deterministic sampler's distance to a reference solution of the same ODE."""
    from attrs import asdict

    from toolkit import evaluate

    payload = {"metric": "ode", **head, "n": n, "seed": seed, "reference_nfe": evaluate.REFERENCE_NFE,
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
    return payload, table
