"""ONNX export: the noise predictor alone, or the whole sampling run (predictor, guidance and every
step) as one graph that takes noise in and gives samples out, so that an application needs only
onnxruntime (see ``toolkit.exporters.runtime``).

One step is traced once with torch.export (dynamic batch) and converted by torch's ONNX exporter;
the sampling run is then built at the ONNX level from that step, either as an ONNX ``Loop`` over the
step (graph size and export time independent of the number of steps) or unrolled (one copy of the
step's nodes per step, the weights shared). Exported graphs take their noise as inputs: random
operators inside ONNX are not reproducible across runtimes, so the default graph makes its noise with the
toolkit's own counter-based generator (toolkit.rng) written in integer ONNX operators.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from attrs import define
from torch import Tensor, nn

from toolkit import optional
from toolkit._version import __version__
from toolkit.errors import ToolkitError
from toolkit.files import atomic_write
from toolkit.graph_index import cache_dir, digest_file, private_dir
from toolkit.pipeline import Pipeline
from toolkit.protocols import GradientGuidance
from toolkit.sampling import as_v2, check_standard_loop, is_v2

SAMPLER_KIND = "diffusion-toolkit-sampler"
RNG_NAME = "toolkit-counter-1"  # toolkit.rng: lowbias32 keyed by (seed, index, draw), Box-Muller
PREDICTOR_KIND = "diffusion-toolkit-predictor"
OPSET = 18
LAYOUTS = ("loop", "unrolled")
DEFAULT_LAYOUT = "loop"
NOISE_MODES = ("seed", "inputs")  # noise made in the graph from a seed, or fed by the app
PRECISIONS = ("fp32", "fp16")  # the network's weights and arithmetic; the sampler's loop is float32 in both
DEFAULT_NOISE = "seed"
METADATA_VERSION = 2  # every metadata value is JSON
MAX_BATCH = 1 << 20


def _onnx():
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter's backend)
    except ImportError as exc:
        raise ToolkitError("ONNX export needs onnx and onnxscript: pip install onnx onnxscript") from exc
    return onnx


class StepGraph(nn.Module):
    """Iteration i of a pipeline's sampling run, the sampler's own ``step``: (x, *state) → (x, *state),
    with every per-step constant read from the sampler's plan by index."""

    def __init__(self, pipeline: Pipeline, inpaint: Any = None):
        super().__init__()
        if not isinstance(pipeline.predictor, nn.Module):
            raise ToolkitError("only a torch.nn.Module predictor can be exported")
        if pipeline.mean_shift or isinstance(pipeline.guidance, GradientGuidance):
            raise ToolkitError(
                f"guidance {pipeline.guidance.name!r} cannot be exported: every step needs the classifier's "
                "input gradient ∇log p(y|x_t); torch.export does not trace torch.autograd.grad, and the "
                "backward graph that make_fx can capture instead uses ops torch's ONNX exporter cannot "
                "convert (aten.convolution_backward). Use cfg, or sample this guidance with PyTorch")
        sampler = pipeline.sampler
        if not is_v2(sampler):  # plugin API 1: only the standard loop can be reproduced
            check_standard_loop(sampler, pipeline.schedule, pipeline.steps, tuple(pipeline.sample_shape))
        self.sampler = as_v2(sampler) if inpaint is None else inpaint
        self.inpaint = inpaint is not None
        self.pipeline = pipeline
        self.net = pipeline.predictor  # registered, so its weights become graph initializers
        self.plan = self.sampler.plan(pipeline.schedule, pipeline.steps)
        self.step_plan = self.plan.cast(torch.float32)
        self.time_map = pipeline.model_time_fn()  # built here: the schedule comparison stays out of the trace
        self.iterations = len(self.plan)
        self.draws = self.plan.draws_per_step
        self.conditional = pipeline.num_classes is not None
        self.guided = pipeline.guidance is not None

    def forward(self, x: Tensor, i: Tensor, noise: Tensor | None = None, labels: Tensor | None = None,
                scale: Tensor | None = None, image: Tensor | None = None, mask: Tensor | None = None,
                state: list[Tensor] | None = None) -> tuple[Tensor, ...]:
        p = self.pipeline
        B = x.shape[0]
        if labels is None and self.conditional:
            labels = torch.full((B,), int(p.num_classes), dtype=torch.long, device=x.device)
        model_fn = p.model_fn(labels, scale, self.time_map)
        sampler = self.sampler.bind(image, mask) if self.inpaint else self.sampler
        x, new_state = sampler.step(model_fn, x, tuple(state or ()), i, self.step_plan, noise)
        return (x, *new_state)


class HalfNetwork(nn.Module):
    """The network in float16 inside the float32 loop (``precision="fp16"``): x goes in as float16, the
    output comes back as float32, so the step's coefficients and the noise stay float32. For onnxruntime's
    CUDA provider (half the weight bytes, tensor cores); its error against float32 is measured by
    ``bench/bench_gpu.py``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        import copy

        self.net = copy.deepcopy(net).half()
        for name in ("sample_shape", "num_classes", "prediction", "learned_variance"):
            if hasattr(net, name):
                setattr(self, name, getattr(net, name))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.net(x.half(), t, y).float()


class InitGraph(nn.Module):
    """The sampler's initial state from x_T (e.g. zeros for a multistep solver's history)."""

    def __init__(self, sampler, plan):
        super().__init__()
        self.sampler, self.plan = sampler, plan

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.sampler.init_state(x, self.plan))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:400]
    return type(exc).__name__


def _to_onnx(module: nn.Module, args: tuple, names: list[str], dynamic: tuple, output: str | list[str], what: str):
    """torch.export (so a lost dynamic batch is an error, not a silently static graph), then ONNX."""
    _onnx()
    try:
        program = torch.export.export(module, args, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:  # noqa: BLE001 - whatever torch.export trips on, name what failed and why
        raise ToolkitError(f"cannot export {what}: torch.export cannot trace it ({_first_line(exc)})") from exc
    quiet = logging.getLogger("torch.onnx")  # e.g. "torchvision is not installed" on every export
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(program, args, input_names=names,
                                             output_names=[output] if isinstance(output, str) else list(output),
                                             dynamo=True, opset_version=OPSET, verbose=False,
                                             optimize=True)
    except Exception as exc:  # noqa: BLE001
        raise ToolkitError(f"cannot export {what}: the ONNX conversion failed ({_first_line(exc)})") from exc
    finally:
        quiet.setLevel(level)
    model = onnx_program.model_proto
    _name_batch_dim(model)
    for inp in model.graph.input:
        dim0 = inp.type.tensor_type.shape.dim[0] if inp.type.tensor_type.shape.dim else None
        dims = inp.type.tensor_type.shape.dim
        if inp.name == "noise" and len(dims) > 1:
            dim0 = dims[1]  # noise [draws, batch, ...]
        if (inp.name in ("x", "labels", "scale", "y", "t", "noise", "image", "mask") or inp.name.startswith("state")) \
                and dim0 is not None and not dim0.dim_param:
            raise ToolkitError(f"cannot export {what}: input {inp.name!r} lost its dynamic batch dimension")
    return model


# ---------------------------------------------------------------- building the run from one step


def _name_batch_dim(model) -> None:
    """torch.export names the dynamic batch after a symbol (``s13``): call it ``batch`` everywhere."""
    first = model.graph.input[0].type.tensor_type.shape.dim if model.graph.input else []
    symbol = first[0].dim_param if first and first[0].dim_param else None
    if symbol is None or symbol == "batch":
        return
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = "batch"


def _renamer(keep: set[str], mapping: dict[str, str], prefix: str):
    """Value names of a copied graph: initializers kept, inputs mapped, everything else prefixed."""
    def name(n: str) -> str:
        if not n or n in keep:
            return n
        return mapping.get(n, prefix + n)
    return name


def _copy_nodes(onnx, graph, keep: set[str], mapping: dict[str, str], prefix: str) -> list:
    rename = _renamer(keep, mapping, prefix)
    nodes = []
    for node in graph.node:
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.name = prefix + node.name
        del new.metadata_props[:]  # the exporter's per-node stack traces, once per copy otherwise
        new.doc_string = ""
        del new.input[:]
        del new.output[:]
        new.input.extend(rename(n) for n in node.input)
        new.output.extend(rename(n) for n in node.output)
        nodes.append(new)
    return nodes


def _copy_graph(onnx, model, prefix: str, mapping: dict[str, str], initializers: list) -> tuple[list, list[str]]:
    """A whole small model's nodes (its initializers renamed under ``prefix``); returns nodes and output names."""
    keep: set[str] = set()
    for init in model.graph.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(init)
        copy.name = prefix + init.name
        initializers.append(copy)
    nodes = _copy_nodes(onnx, model.graph, keep, mapping, prefix)
    return nodes, [mapping.get(o.name, prefix + o.name) for o in model.graph.output]


def _check(b, ok: str, message: str, dtype: str = "float") -> str:
    """A node that fails with ``message`` (its name, which onnxruntime prints) unless the int64 scalar ``ok`` is 1:
    ONNX has no assert, so a Gather from a one-element table gets an index out of range. Returns a 0 of
    ``dtype`` that the caller adds into the run, so the check is never pruned as dead code."""
    index = b.op("Where", b.op("Equal", ok, b.const(1)), b.const(0), b.const(1 << 40))
    return b.op("Gather", b.const([0], dtype, [1]), index, axis=0, name=f"input check failed: {message}")


def _all(b, cond: str) -> str:
    """int64 scalar 1 when every element of the bool tensor ``cond`` is true."""
    return b.op("ReduceMin", b.op("Cast", cond, to=b.T.INT64), keepdims=0)


def _same_batch(b, a: str, a_axis: int, ref: str) -> str:
    return _all(b, b.op("Equal", b.op("Shape", a, start=a_axis, end=a_axis + 1), b.op("Shape", ref, start=0, end=1)))


def _input_checks(b, inputs: list[str], batch_ref: str, num_classes: int | None) -> tuple[dict[str, str], list[str]]:
    """In-graph checks of the inputs an app feeds (every runtime gets them, not only Python's): labels in
    0..K and of batch length, scale finite, ≥ 0 and of batch length, image in [-1, 1] and mask 0/1 of batch length,
    noise of batch length, seed and index ≥ 0. Returns the checked conditioning inputs by name (input + its checks'
    zeros, so every consumer runs after the checks) and the zeros to add to x_T."""
    labels, scale, zeros = "labels", "scale", []
    if "labels" in inputs and num_classes is not None:
        inside = b.op("And", b.op("GreaterOrEqual", "labels", b.const(0)),
                      b.op("LessOrEqual", "labels", b.const(int(num_classes))))
        labels = b.op("Add", labels, _check(b, _all(b, inside), f"labels must lie in 0..{num_classes} "
                                             f"({num_classes}: the null label)", "int64"))
        labels = b.op("Add", labels, _check(b, _same_batch(b, "labels", 0, batch_ref),
                                             f"labels must hold one label per sample (the batch of {batch_ref})",
                                             "int64"))
    if "scale" in inputs:
        ok = b.op("And", b.op("GreaterOrEqual", "scale", b.const(0.0, "float")), b.op("Not", b.op("IsInf", "scale")))
        scale = b.op("Add", scale, _check(b, _all(b, ok), "scale must be finite and >= 0"))
        scale = b.op("Add", scale, _check(b, _same_batch(b, "scale", 0, batch_ref),
                                           f"scale must hold one value per sample (the batch of {batch_ref})"))
    checked = {"labels": labels, "scale": scale}
    if "image" in inputs:  # inpainting: the known data and the 0/1 fill mask
        ok = b.op("And", b.op("GreaterOrEqual", "image", b.const(-1.0, "float")),
                  b.op("LessOrEqual", "image", b.const(1.0, "float")))
        image = b.op("Add", "image", _check(b, _all(b, ok), "image values must lie in [-1, 1]"))
        checked["image"] = b.op("Add", image, _check(b, _same_batch(b, "image", 0, batch_ref),
                                                     f"image must hold one image per sample (the batch of {batch_ref})"))
        binary = b.op("Or", b.op("Equal", "mask", b.const(0.0, "float")), b.op("Equal", "mask", b.const(1.0, "float")))
        mask = b.op("Add", "mask", _check(b, _all(b, binary), "mask must be binary (1 = fill in, 0 = keep)"))
        checked["mask"] = b.op("Add", mask, _check(b, _same_batch(b, "mask", 0, batch_ref),
                                                   f"mask must hold one mask per sample (the batch of {batch_ref})"))
    if "noise" in inputs:
        zeros.append(_check(b, _same_batch(b, "noise", 1, batch_ref),
                            "noise must be [slots, batch, ...] with the batch of x_T"))
    for name in ("seed", "index"):
        if name in inputs:
            zeros.append(_check(b, _all(b, b.op("GreaterOrEqual", name, b.const(0))), f"{name} must be >= 0"))
    return checked, zeros


def _seed_noise(b, draws: list[str], sample_shape: tuple[int, ...]) -> str:
    """Step noise [len(draws), batch, *shape] from the graph inputs seed and index (toolkit.rng, in ONNX)."""
    from toolkit.rng import onnx_normal

    parts = [b.op("Unsqueeze", onnx_normal(b, "seed", "index", d, sample_shape), b.ints([0])) for d in draws]
    return b.op("Concat", *parts, axis=0)


@define(frozen=True)
class _StepParts:
    """The one-step model's pieces that each layout copies: its graph, its state names, its outputs."""

    graph: Any
    keep: frozenset  # initializer names (shared by every copy)
    state_in: tuple[str, ...]
    step_outs: tuple[str, ...]  # x_prev, then the new state in order
    outer: dict  # labels, scale (image, mask): the graph's checked inputs
    iterations: int
    draws: int
    sample_shape: tuple[int, ...]
    makes_noise: bool  # a seed-only graph of a sampler that draws noise
    has_noise: bool  # a graph with a noise input


def _graph_inputs(inputs: list[str], iterations: int, draws: int, batch_dims: list[Any]) -> list:
    from onnx import TensorProto, helper

    if "seed" in inputs:
        out = [helper.make_tensor_value_info("seed", TensorProto.INT64, []),
               helper.make_tensor_value_info("index", TensorProto.INT64, ["batch"])]
    else:
        out = [helper.make_tensor_value_info("x_T", TensorProto.FLOAT, batch_dims)]
    if "noise" in inputs:
        out.append(helper.make_tensor_value_info("noise", TensorProto.FLOAT, [iterations * draws, *batch_dims]))
    if "labels" in inputs:
        out.append(helper.make_tensor_value_info("labels", TensorProto.INT64, ["batch"]))
    if "scale" in inputs:
        out.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, ["batch"]))
    for name in ("image", "mask"):
        if name in inputs:
            out.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, batch_dims))
    return out


def _unrolled(onnx, parts: _StepParts, init_state: list[str], nodes: list) -> str:
    """Every iteration as its own copy of the step's nodes; returns the final x."""
    from onnx import TensorProto, helper

    from toolkit.rng import OnnxBuilder

    x, state, draws = "x_start", list(init_state), parts.draws
    for k in range(parts.iterations):
        p = f"step{k}/"
        mapping = {**parts.outer, "x": x, "i": p + "i", **dict(zip(parts.state_in, state))}
        nodes.append(helper.make_node("Constant", [], [p + "i"], value=helper.make_tensor(
            p + "i_value", TensorProto.INT64, [], [k])))
        if parts.makes_noise:  # iteration k's draws 1 + k·D + d
            bk = OnnxBuilder(p + "noise/", nodes)
            mapping["noise"] = _seed_noise(bk, [bk.const(1 + k * draws + d) for d in range(draws)], parts.sample_shape)
        if parts.has_noise:
            nodes.append(helper.make_node("Gather", ["noise_slots", p + "i"], [p + "slots"], axis=0))
            nodes.append(helper.make_node("Gather", ["noise", p + "slots"], [p + "noise"], axis=0))
            mapping["noise"] = p + "noise"
        nodes += _copy_nodes(onnx, parts.graph, parts.keep, mapping, p)
        rename = _renamer(parts.keep, mapping, p)  # the names _copy_nodes gave this copy's outputs
        x, *state = [rename(o) for o in parts.step_outs]
    return x


def _loop(onnx, parts: _StepParts, init_state: list[str], nodes: list, batch_dims: list[Any]) -> str:
    """An ONNX Loop over one copy of the step, carrying (x, *state); returns the final x."""
    from onnx import TensorProto, helper

    from toolkit.rng import OnnxBuilder

    body_nodes: list = []
    state_in, draws = parts.state_in, parts.draws
    mapping = {**parts.outer, "x": "x_in", "i": "iter", **{s_: f"{s_}_in" for s_ in state_in}}
    if parts.makes_noise:  # iteration i's draws 1 + i·D + d
        bb = OnnxBuilder("noise/", body_nodes)
        first = bb.op("Mul", "iter", bb.const(draws))
        mapping["noise"] = _seed_noise(bb, [bb.op("Add", first, bb.const(1 + d)) for d in range(draws)],
                                       parts.sample_shape)
    if parts.has_noise:
        body_nodes.append(helper.make_node("Gather", ["noise_slots", "iter"], ["slots_i"], axis=0))
        body_nodes.append(helper.make_node("Gather", ["noise", "slots_i"], ["noise_i"], axis=0))
        mapping["noise"] = "noise_i"
    body_nodes += _copy_nodes(onnx, parts.graph, parts.keep, mapping, "")
    body_nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"]))
    carried_out = ["x_out", *[f"{s_}_out" for s_ in state_in]]
    rename = _renamer(parts.keep, mapping, "")
    for src, dst in zip(parts.step_outs, carried_out):
        body_nodes.append(helper.make_node("Identity", [rename(src)], [dst]))
    state_info = lambda suffix: [helper.make_tensor_value_info(f"{s_}{suffix}", TensorProto.FLOAT, None)  # noqa: E731
                                 for s_ in state_in]
    body = helper.make_graph(
        body_nodes, "step",
        [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_in", TensorProto.FLOAT, batch_dims), *state_info("_in")],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_out", TensorProto.FLOAT, batch_dims), *state_info("_out")],
        initializer=list(parts.graph.initializer))  # inside the body: onnxruntime optimizes (pre-packs) them only there
    nodes.append(helper.make_node("Constant", [], ["trip_count"],
                                  value=helper.make_tensor("S", TensorProto.INT64, [], [parts.iterations])))
    nodes.append(helper.make_node("Constant", [], ["cond"],
                                  value=helper.make_tensor("true", TensorProto.BOOL, [], [True])))
    nodes.append(helper.make_node("Loop", ["trip_count", "cond", "x_start", *init_state],
                                  ["x_loop", *[f"{s_}_final" for s_ in state_in]], body=body))
    return "x_loop"


def _sampler_model(step_model, iterations: int, draws: int, inputs: list[str], sample_shape: tuple[int, ...],
                   layout: str, init_model=None, decoder=None, output_shape: tuple[int, ...] | None = None,
                   num_classes: int | None = None, value_range: tuple[float, float] | None = (-1.0, 1.0)):
    """The whole run as one ONNX model from the one-step model (inputs x, i[, noise, labels, scale],
    state...; outputs x_prev, state...): the initial state from x_T (``init_model``), then an ONNX Loop
    (or unrolled copies) carrying (x, *state), then a latent pipeline's decoder (input z).

    ``inputs`` names the graph's inputs: ``seed`` and ``index`` (the noise is made inside the graph by
    toolkit.rng: x_T is draw 0, iteration k's draws are 1 + k·D ...), or ``x_T`` (and ``noise``)."""
    onnx = _onnx()
    from onnx import TensorProto, helper

    from toolkit.rng import OnnxBuilder, onnx_normal

    g = step_model.graph
    keep = frozenset(init.name for init in g.initializer)
    state_in = tuple(v.name for v in g.input if v.name.startswith("state"))
    seeded = "seed" in inputs
    batch_dims: list[Any] = ["batch", *sample_shape]
    nodes: list = []
    b = OnnxBuilder("in/", nodes)
    checked, zeros = _input_checks(b, inputs, "index" if seeded else "x_T", num_classes)
    parts = _StepParts(g, keep, state_in, tuple(o.name for o in g.output), checked,
                       iterations, draws, tuple(sample_shape), seeded and draws > 0, "noise" in inputs)
    source = onnx_normal(b, "seed", "index", b.const(0), sample_shape) if seeded else "x_T"  # draw 0 is x_T
    nodes.append(helper.make_node("Sum", [source, *zeros], ["x_start"]))  # + the checks' zeros
    initializers = list(g.initializer)
    init_state: list[str] = []
    if state_in:
        init_nodes, init_state = _copy_graph(onnx, init_model, "init/", {"x": "x_start"}, initializers)
        nodes += init_nodes
    if parts.has_noise:  # iteration i reads noise slots i·D .. i·D + D - 1
        initializers.append(helper.make_tensor("noise_slots", TensorProto.INT64, [iterations, draws],
                                               list(range(iterations * draws))))
    if layout == "unrolled":
        final = _unrolled(onnx, parts, init_state, nodes)
    else:
        final = _loop(onnx, parts, init_state, nodes, batch_dims)
        initializers = [t for t in initializers if t.name not in keep]  # they live in the Loop's body
    if decoder is not None:  # latent diffusion: decode the final latents inside the graph
        dec_nodes, dec_outs = _copy_graph(onnx, decoder, "decode/", {"z": final}, initializers)
        nodes += dec_nodes
        final = dec_outs[0]
    out_dims: list[Any] = ["batch", *(output_shape or sample_shape)]
    if value_range is not None:  # images: clamped to [-1, 1], as the torch pipeline returns them
        lo, hi = value_range
        nodes.append(helper.make_node("Constant", [], ["lo"], value=helper.make_tensor("lo_v", TensorProto.FLOAT, [], [lo])))
        nodes.append(helper.make_node("Constant", [], ["hi"], value=helper.make_tensor("hi_v", TensorProto.FLOAT, [], [hi])))
        nodes.append(helper.make_node("Clip", [final, "lo", "hi"], ["x0"]))
    else:
        nodes.append(helper.make_node("Identity", [final], ["x0"]))
    graph = helper.make_graph(nodes, "sampler", _graph_inputs(inputs, iterations, draws, batch_dims),
                              [helper.make_tensor_value_info("x0", TensorProto.FLOAT, out_dims)],
                              initializer=initializers)
    model = helper.make_model(graph, opset_imports=list(step_model.opset_import),
                              producer_name="diffusion-toolkit", producer_version=__version__)
    model.ir_version = step_model.ir_version
    model.functions.extend(step_model.functions)
    for extra in (init_model, decoder):
        if extra is not None:
            model.functions.extend(extra.functions)
    return model


def sampler_options(sampler: Any) -> dict[str, Any]:
    """Every option of a sampler, JSON-ready: an attrs class's init fields, else its public plain attributes."""
    import attrs

    def plain(v: Any) -> bool:
        return v is None or isinstance(v, (bool, int, float, str)) or (
            isinstance(v, (list, tuple)) and all(plain(e) for e in v))

    if attrs.has(type(sampler)):
        values = {a.name: getattr(sampler, a.name) for a in attrs.fields(type(sampler)) if a.init}
    else:
        values = {k: v for k, v in vars(sampler).items() if not k.startswith("_")}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items() if plain(v) and k != "name"}


def sampler_metadata(pipeline: Pipeline, layout: str, inputs: list[str], plan: Any = None) -> dict[str, str]:
    """What travels in the ONNX file's metadata_props: every value JSON-encoded (``"cosine"``, ``10``,
    ``null``), so any runtime reads them with one JSON parser; the same object is written to PATH.json."""
    sampler = pipeline.sampler
    plan = pipeline.plan if plan is None else plan
    data = pipeline.config.get("data", {})
    guidance = pipeline.guidance
    meta = {
        "kind": SAMPLER_KIND,
        "metadata_version": METADATA_VERSION,
        "toolkit_version": __version__,
        "schedule": pipeline.schedule.name,
        "num_timesteps": pipeline.schedule.num_timesteps,
        "sampler": sampler.name,
        "sampler_options": sampler_options(sampler),
        "plugin_api": 2 if is_v2(sampler) else 1,
        "steps": pipeline.steps,
        "iterations": len(plan),
        "nfe": plan.nfe,
        "draws_per_step": plan.draws_per_step,
        "noise_slots": plan.noise_slots,
        "noise": "seed" if "seed" in inputs else "inputs",
        "rng": RNG_NAME,
        "timesteps": plan.t.tolist(),
        "eta": optional.option(sampler, "eta"),
        "stochastic": plan.draws_per_step > 0,
        "sample_shape": list(pipeline.sample_shape),
        "output_shape": list(pipeline.output_shape),
        "value_range": list(pipeline.value_range) if pipeline.value_range is not None else None,
        "num_classes": pipeline.num_classes,
        "null_label": pipeline.num_classes,
        "class_names": data.get("class_names"),
        "dataset": data.get("name"),
        "guidance": guidance.name if guidance is not None else None,
        "guidance_scale": optional.option(guidance, "scale") if guidance is not None else None,
        "guidance_options": sampler_options(guidance) if guidance is not None else None,
        "model": pipeline.config.get("model", {}).get("name"),
        "layout": layout,
        "inputs": inputs,
        "latent": pipeline.latent.to_json() if pipeline.latent is not None else None,
    }
    return {k: json.dumps(v, sort_keys=True) for k, v in meta.items()}


def _save(model, path: str | os.PathLike, meta: dict[str, str]) -> Path:
    onnx = _onnx()
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ToolkitError(f"output folder {str(parent)!r} does not exist")
    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001
        raise ToolkitError(f"the exported graph is not valid ONNX ({_first_line(exc)})") from exc
    atomic_write(path, lambda tmp: onnx.save_model(model, tmp))
    sidecar = json.dumps({k: json.loads(v) for k, v in meta.items()}, indent=2, sort_keys=True) + "\n"
    atomic_write(Path(f"{path}.json"), lambda tmp: Path(tmp).write_text(sidecar))  # for apps without protobuf
    return path


def export_sampler(pipeline: Pipeline, path: str | os.PathLike, *, layout: str = DEFAULT_LAYOUT,
                   steps: int | None = None, noise: str = DEFAULT_NOISE, task: str = "sample",
                   resample: int | None = None, jump: int | None = None, precision: str = "fp32") -> Path:
    """Write the whole sampling run of ``pipeline`` (sampler, steps, guidance) as one ONNX graph, and its
    metadata as JSON beside it (PATH.json).

    ``noise="seed"`` (the default): inputs seed [] int64 and index [B] int64 (the sample numbers, e.g.
    0..B-1); the graph makes x_T and every step's noise itself with toolkit.rng, so sample i of seed s is
    the same in every runtime. ``noise="inputs"``: x_T [B, *shape] float32, and noise [N, B, *shape] for a
    sampler that draws noise (N = iterations × draws per step, metadata ``noise_slots``; iteration i reads
    slots i·D..i·D+D-1). Both: labels [B] int64 for a class-conditional model (the null label K samples
    unconditionally); scale [B] float32 with guidance. Output: x0 [B, *shape] in [-1, 1]. The graph refuses
    labels outside 0..K, inputs of another batch size and a negative or non-finite scale.
    ``layout``: "loop" (an ONNX Loop over one step) or "unrolled".

    ``task="inpaint"``: the run of ``Pipeline.inpaint`` (RePaint with ``resample`` × ``jump``), with two more
    inputs, image [B, *shape] in [-1, 1] (the known data) and mask [B, *shape] of 0/1 (1 = fill in).
    ``precision="fp16"``: the network's weights and arithmetic in float16 (``HalfNetwork``), for
    onnxruntime's CUDA provider; inputs, outputs and the loop stay float32.
    """
    if precision not in PRECISIONS:
        raise ToolkitError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if layout not in LAYOUTS:
        raise ToolkitError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    if noise not in NOISE_MODES:
        raise ToolkitError(f"noise must be one of {', '.join(NOISE_MODES)}, not {noise!r}")
    if steps is not None and steps != pipeline.steps:
        from attrs import evolve

        from toolkit.sampling import sampler_plan

        sampler_plan(pipeline.sampler, pipeline.schedule, steps)
        pipeline = evolve(pipeline, steps=int(steps))
    wrapper = _task_sampler(pipeline, task, resample, jump)
    if precision == "fp16":
        from attrs import evolve

        if not isinstance(pipeline.predictor, nn.Module):
            raise ToolkitError("only a torch.nn.Module predictor can be exported")
        pipeline = evolve(pipeline, predictor=HalfNetwork(pipeline.predictor).eval())
    step = StepGraph(pipeline, wrapper).eval()
    shape = tuple(pipeline.sample_shape)
    B, b = torch.export.Dim("batch", min=1, max=MAX_BATCH), 3
    x_ex = torch.randn(b, *shape)
    state = [s_.detach() for s_ in step.sampler.init_state(x_ex, step.step_plan)]
    state = [s_ + 0.1 * torch.randn_like(s_) for s_ in state]  # example values only: no constant folding of zeros
    args: list[Any] = [x_ex, torch.tensor(0)]
    names, dynamic = ["x", "i"], [{0: B}, None]
    for flag, name, value, dyn in (
            (step.draws > 0, "noise", torch.randn(max(step.draws, 1), b, *shape), {1: B}),
            (step.conditional, "labels", torch.arange(b) % max(1, pipeline.num_classes or 1), {0: B}),
            (step.guided, "scale", torch.ones(b), {0: B}),
            (step.inpaint, "image", torch.rand(b, *shape) * 2 - 1, {0: B}),
            (step.inpaint, "mask", (torch.rand(b, *shape) > 0.5).float(), {0: B})):
        args.append(value if flag else None)
        dynamic.append(dyn if flag else None)
        if flag:
            names.append(name)
    args.append(state)
    dynamic.append([{0: B} for _ in state])
    state_names = [f"state{k}" for k in range(len(state))]
    names += state_names
    what = f"sampler {pipeline.sampler.name!r}"
    if step.guided:
        what += f" with guidance {pipeline.guidance.name!r}"
    step_model = _to_onnx(step, tuple(args), names, tuple(dynamic), ["x_prev", *[f"{n}_next" for n in state_names]],
                          what)
    init_model = None
    if state:
        init_model = _to_onnx(InitGraph(step.sampler, step.step_plan).eval(), (x_ex,), ["x"], ({0: B},),
                              [f"init{k}" for k in range(len(state))], f"the initial state of {what}")
    inputs = [n for n in names[2:] if not n.startswith("state")]
    inputs = ["seed", "index", *(n for n in inputs if n != "noise")] if noise == "seed" else ["x_T", *inputs]
    decoder = None
    if pipeline.latent is not None:
        decoder = _to_onnx(DecoderGraph(pipeline.latent).eval(), (torch.randn(b, *shape),), ["z"], ({0: B},), "x",
                           "the latent decoder")
    model = _sampler_model(step_model, step.iterations, step.draws, inputs, shape, layout, init_model, decoder,
                           pipeline.output_shape, pipeline.num_classes, pipeline.value_range)
    meta = sampler_metadata(pipeline, layout, inputs, step.plan)
    meta["task"] = json.dumps(task)
    meta["precision"] = json.dumps(precision)
    if wrapper is not None:
        meta["inpaint"] = json.dumps({"resample": wrapper.resample, "jump": wrapper.jump, "mask": "1 = fill in"})
    return _save(model, path, meta)


TASKS = ("sample", "inpaint")


def _task_sampler(pipeline: Pipeline, task: str, resample: int | None, jump: int | None):
    """None for plain sampling; the Inpaint wrapper of the pipeline's sampler for ``task="inpaint"``."""
    if task not in TASKS:
        raise ToolkitError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    if task == "sample":
        if resample is not None or jump is not None:
            raise ToolkitError("resample and jump are options of task 'inpaint'")
        return None
    from toolkit import inpainting

    if pipeline.latent is not None:
        raise ToolkitError("an inpainting graph is exported for pixel-space models only: a latent pipeline inpaints "
                           "with PyTorch (Pipeline.inpaint), which encodes the image and pastes the kept pixels back")
    return inpainting.sampler(pipeline, inpainting.DEFAULT_RESAMPLE if resample is None else resample,
                              inpainting.DEFAULT_JUMP if jump is None else jump)


class DecoderGraph(nn.Module):
    """A latent pipeline's decoder: scaled latents → data."""

    def __init__(self, latent):
        super().__init__()
        self.latent = latent
        self.net = latent.autoencoder

    def forward(self, z: Tensor) -> Tensor:
        return self.latent.decode(z)


class PredictorGraph(nn.Module):
    def __init__(self, predictor: nn.Module):
        super().__init__()
        self.net = predictor

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.net(x, t, y)


def export_predictor(predictor: nn.Module | Pipeline, path: str | os.PathLike,
                     config: dict[str, Any] | None = None) -> Path:
    """Write the noise predictor ε_θ(x, t[, y]) alone: x [B, *shape], t [B] float32 (training-schedule
    timesteps, fractional allowed), y [B] int64 for a class-conditional model; dynamic batch."""
    if isinstance(predictor, Pipeline):
        config = config or predictor.config
        predictor = predictor.predictor
    if not isinstance(predictor, nn.Module):
        raise ToolkitError("only a torch.nn.Module predictor can be exported")
    shape = tuple(predictor.sample_shape)
    B, b = torch.export.Dim("batch", min=1, max=MAX_BATCH), 3
    conditional = predictor.num_classes is not None
    args = (torch.randn(b, *shape), torch.tensor([10.0, 500.0, 999.0]),
            torch.arange(b) % predictor.num_classes if conditional else None)
    names = ["x", "t", "y"] if conditional else ["x", "t"]
    dynamic = ({0: B}, {0: B}, {0: B} if conditional else None)
    model = _to_onnx(PredictorGraph(predictor).eval(), args, names, dynamic, "out", "the predictor")
    cfg = config or {}
    prediction = optional.prediction(predictor)
    alphas_cumprod = None
    if cfg.get("schedule"):  # an app can write its own sampling loop from ᾱ_t (Ho et al. eq. 4)
        from toolkit.checkpoint import build_schedule

        alphas_cumprod = build_schedule(cfg).alphas_cumprod.tolist()
    meta = {"kind": PREDICTOR_KIND, "metadata_version": METADATA_VERSION, "toolkit_version": __version__,
            "sample_shape": list(shape), "num_classes": predictor.num_classes,
            "null_label": predictor.num_classes, "prediction": prediction,
            "output": {"epsilon": "the noise ε", "v": "the velocity v = √ᾱ ε − √(1−ᾱ) x_0",
                       "x0": "the clean sample x_0"}.get(prediction, prediction)
            + (", then the variance interpolation v of Improved DDPM (channels C..2C)"
               if optional.learned_variance(predictor) else ""),
            "learned_variance": optional.learned_variance(predictor),
            "schedule": cfg.get("schedule"), "alphas_cumprod": alphas_cumprod, "inputs": names,
            "value_range": [-1, 1] if prediction == "x0" else None}  # ε and v are unbounded
    return _save(model, path, {k: json.dumps(v, sort_keys=True) for k, v in meta.items()})


# ---------------------------------------------------------------- the onnxruntime backend of compose


def _fingerprint(pipeline: Pipeline, layout: str) -> str:
    """The cache key of a pipeline's graph: everything the metadata records, the schedule, the weights."""
    import hashlib

    from toolkit.checkpoint import weights_fingerprint

    h = hashlib.sha256()
    h.update(json.dumps([sampler_metadata(pipeline, layout, []), torch.__version__, repr(pipeline.sampler),
                         repr(pipeline.guidance)], sort_keys=True, default=str).encode())
    h.update(pipeline.schedule.alphas_cumprod.detach().cpu().double().numpy().tobytes())
    h.update(weights_fingerprint(pipeline.predictor.state_dict()).encode())
    return h.hexdigest()[:24]


def _cache_entry_ok(path: Path, pipeline: Pipeline, layout: str) -> bool:
    """A cached graph is used only when its recorded hash matches its bytes and its metadata is the pipeline's."""
    try:
        import onnx  # not _onnx(): reading a cached graph needs no exporter (onnxscript takes 0.5 s to import)
    except ImportError:
        return False
    digest = path.with_suffix(".sha256")
    try:
        if digest.read_text().strip() != digest_file(path):
            return False
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - unreadable or corrupt: export again
        return False
    meta = {p.key: p.value for p in model.metadata_props}
    want = sampler_metadata(pipeline, layout, json.loads(meta.get("inputs", "[]")))
    return all(meta.get(k) == v for k, v in want.items())


def cached_sampler_graph(pipeline: Pipeline, layout: str = DEFAULT_LAYOUT) -> Path:
    """The pipeline's sampler graph from the cache, exported there first if it is not yet.

    Trust model: the cache folder must be this user's and not writable by others; each entry's SHA-256 is
    recorded beside it and checked, and its metadata must describe this very pipeline (sampler, options,
    steps, time grid, schedule, guidance, shapes), else it is exported again.
    """
    folder = private_dir(cache_dir())
    path = folder / f"{pipeline.sampler.name}-{pipeline.steps}-{_fingerprint(pipeline, layout)}.onnx"
    if not (path.is_file() and _cache_entry_ok(path, pipeline, layout)):
        export_sampler(pipeline, path, layout=layout)
        digest = digest_file(path)
        atomic_write(path.with_suffix(".sha256"), lambda tmp: Path(tmp).write_text(digest + "\n"))
    return path


def sample_onnx(session, n: int, seed: int = 0, labels: Any = None, scale: Any = None, *, offset: int = 0,
                batch_size: int = 500) -> Tensor:
    """Sample through a ``runtime.SamplerSession`` with the toolkit's torch noise streams, so the samples
    equal ``Pipeline.sample`` for the same seed (within float tolerance)."""
    return torch.cat(list(onnx_batches(session, n, seed, labels, scale, offset=offset, batch_size=batch_size)))


def onnx_batches(session, n: int, seed: int = 0, labels: Any = None, scale: Any = None, *, offset: int = 0,
                 batch_size: int = 500, image: Any = None, mask: Any = None) -> Iterator[Tensor]:
    """The samples of :func:`sample_onnx`, one batch at a time as tensors (``backends.graph_batches``)."""
    from toolkit.backends import graph_batches

    return (torch.from_numpy(x) for x in graph_batches(session, n, seed, labels, scale, offset=offset,
                                                        batch_size=batch_size, image=image, mask=mask))
