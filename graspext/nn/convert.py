"""``sparsify`` swaps pruned Conv2d/Linear layers for sparse ones; ``densify`` swaps them back.

Per layer, the sparse kernels, dense torch, or dense torch on the live channels only ("compact": layers with
dead channels) is chosen by a cost model (``policy="auto"``: on the CPU the sparse kernels win below a
break-even density; on CUDA, where they win or lose by shape rather than density, it keeps cuDNN), by timing
the candidates on the layer's real input shape and device (``policy="measure"``), or forced.
Every choice is recorded on the layer (``layer.decision``) and listed by :func:`sparsity_report`.
"""

from __future__ import annotations

import copy
import itertools
import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from graspext.nn.layout import Conv2d as LayoutConv2d
from graspext.nn.layout import from_layout_module, fuse_batch_norm_relu, to_layout_module
from graspext.nn.modules import SparseConv2d, SparseLinear, _cuda_kernels_enabled

POLICIES = ("auto", "sparse", "dense", "compact", "measure")

# Densities below which the sparse kernels beat dense oneDNN/MKL for a forward+backward pass, measured per
# layer on a 2-core AVX-512 CPU (benchmarks/RESULTS.md): sparse time grows about linearly with density, dense
# time is flat. Linear: 4096x4096 at batch 256. Convolutions: by the layer's width sqrt(C_in/groups * C_out),
# 3x3 layers at batch 64 on CIFAR image sizes; narrow layers leave oneDNN's vector lanes idle, so the sparse
# kernels win there up to high densities (16 channels: still 1.9x faster at density 0.7). Between the points
# the break-even is interpolated in log(width); outside, the end points hold.
CONV_BREAK_EVEN_BY_WIDTH = ((16, 0.8), (32, 0.4), (64, 0.35), (128, 0.28), (256, 0.2), (512, 0.16))
BREAK_EVEN_DENSITY = {"linear": 0.08}
# The same under CPU bfloat16 autocast, where the kernels read bfloat16 activations and dense oneDNN runs its
# bfloat16 kernels (channels_last), measured on an AVX512-BF16 CPU without AMX (benchmarks/RESULTS.md). Per
# layer the break-even falls to 0.18-0.3; for whole networks 0.25 trains faster than 0.2 (ResNet32 at 98 %:
# 180-210 against 269-307 ms a step), since every dense layer between sparse ones adds layout conversions and
# mixed-layout residual sums. Dense bfloat16 ran 1.9-2.0x faster than float32 there, as on the AMX CPU of
# issue 12's table (1142 -> 610 ms for VGG19); policy="measure" times the candidates on any other CPU.
BREAK_EVEN_DENSITY_BF16 = {"conv": 0.25, "linear": 0.08}


def cpu_has_amx() -> bool:
    """Whether this CPU reports AMX bfloat16 tiles (which oneDNN uses for dense bfloat16 layers)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
        return False


def conv_break_even(width: float) -> float:
    """``CONV_BREAK_EVEN_BY_WIDTH`` at a convolution's width ``sqrt(C_in/groups * C_out)``."""
    points = CONV_BREAK_EVEN_BY_WIDTH
    if width <= points[0][0]:
        return points[0][1]
    for (w0, d0), (w1, d1) in zip(points, points[1:]):
        if width <= w1:
            t = math.log(width / w0) / math.log(w1 / w0)
            return d0 + t * (d1 - d0)
    return points[-1][1]


def break_even_density(layer: nn.Module, dtype: torch.dtype | None) -> tuple[float, str]:
    """The cost model's break-even density for a sparse layer computing in ``dtype``, and what it assumed."""
    kind = "conv" if isinstance(layer, SparseConv2d) else "linear"
    if dtype == torch.bfloat16:
        return BREAK_EVEN_DENSITY_BF16[kind], f"bfloat16{', AMX' if cpu_has_amx() else ''}"
    if kind == "linear":
        return BREAK_EVEN_DENSITY["linear"], "float32"
    out_channels, in_per_group = layer._dense_shape()[:2]
    width = math.sqrt(out_channels * in_per_group)
    return conv_break_even(width), f"float32, width {width:.0f}"


# The cost model runs a dense layer on its live channels when that removes at least this share of its
# multiply-adds: below it, copying the live input channels and scattering the output may cost more than it
# saves (policy="measure" times it instead).
COMPACT_MIN_SAVING = 0.1
# The trainer's kernels="auto" trains through sparse layers only where the cost model predicts them to save this
# much of the masked layers' time (predicted_saving). Below it, a network whose layers are mixed between the two
# layouts ran slower than masked dense weights: ResNet-20 at batch 64, IMP rounds 2-5 (predicted 0.00-0.16)
# 0.69-0.86x, from round 6 (0.26) 1.20x and more; VGG-16 from round 10 (0.24) 1.16x (benchmarks/RESULTS.md).
AUTO_MIN_SAVING = 0.2


@dataclass(frozen=True)
class LayerChoice:
    """One converted layer in :func:`sparsity_report`."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    density: float
    mode: str
    decision: str
    dtype: str | None = None  # what the layer last computed in ("bfloat16" under CPU autocast); None: not run


def _named_target(model: nn.Module, param_name: str) -> tuple[str, nn.Module]:
    module_name, _, leaf = param_name.rpartition(".")
    if leaf != "weight":
        raise KeyError(f"masks key {param_name!r} does not name a layer weight ('<layer>.weight')")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise KeyError(f"masks key {param_name!r}: the model has no module {module_name!r}") from None
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
        raise TypeError(f"masks key {param_name!r} names a {type(module).__name__}; only Conv2d and Linear layers "
                        "can be sparsified")
    return module_name, module


def tied_weights(model: nn.Module, masks: Mapping[str, Tensor]) -> dict[str, list[str]]:
    """The masked weights that other modules of ``model`` share (tied layers), with those modules' names."""
    users: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor):
            users.setdefault(id(weight), []).append(name)
    tied = {}
    for param_name in masks:
        module_name = param_name.rpartition(".")[0]
        try:
            weight = model.get_submodule(module_name).weight
        except AttributeError:
            continue  # not a layer weight: sparsify names the key
        others = [n for n in users.get(id(weight), []) if n != module_name]
        if others:
            tied[param_name] = others
    return tied


def _replace(root: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Puts ``module`` at ``name`` in ``root`` and returns the root: ``module`` itself where ``name`` is the
    root (a model that is itself a layer, whose mask key is ``"weight"``)."""
    if not name:
        return module
    parent_name, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, leaf, module)
    return root


def _refuse_root_in_place(model: nn.Module, replaced: bool, function: str) -> None:
    if replaced:
        raise ValueError(f"{function}(inplace=True) cannot convert a model that is itself the layer "
                         f"({type(model).__name__}): use the returned model, {function}(model, ...)")


def _median_ms(fn: Callable[[], None], device: torch.device, repeats: int = 3) -> float:
    # CUDA work is asynchronous: each timed call runs between two synchronizations.
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _candidate_modes(layer: nn.Module) -> list[str]:
    """The modes worth timing: sparse where the kernels run on the layer's device, compact with dead channels."""
    device = layer.values.device.type
    modes = ["sparse"] if device == "cpu" or (device == "cuda" and _cuda_kernels_enabled()) else []
    modes.append("dense")
    if layer.compact_mac_fraction < 1 and layer.nnz > 0:
        modes.append("compact")
    return modes


def _time_modes(layer: nn.Module, input_shape: torch.Size, dtype: torch.dtype | None) -> dict[str, float]:
    """Median forward+backward milliseconds of ``layer`` in each candidate mode, under autocast to ``dtype``
    if given (dense modes then run oneDNN's bfloat16 kernels in the channels-last layout they prefer)."""
    device = layer.values.device
    x = torch.randn(input_shape, dtype=layer.values.dtype, device=device)
    if dtype is not None and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    results = {}
    saved = layer.mode
    for mode in _candidate_modes(layer):
        layer.mode = mode

        def step():
            layer.zero_grad(set_to_none=True)
            x.grad = None
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                y = layer(x)
            y.float().sum().backward()

        results[mode] = _median_ms(step, x.device)
    layer.mode = saved
    layer.zero_grad(set_to_none=True)
    layer.computed_dtype = None  # timing runs are not training: the report shows what training ran in
    return results


def _layer_inputs(model: nn.Module, names: list[str], example_input) -> dict[str, torch.Size]:
    shapes: dict[str, torch.Size] = {}

    def record(name):
        def hook(_module, args):
            shapes.setdefault(name, args[0].shape)  # returns None: the arguments stay as they are
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(record(n)) for n in names]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes


def sparsify(model: nn.Module, masks: Mapping[str, Tensor], *, inplace: bool = False, policy: str = "auto",
             example_input: Tensor | tuple | None = None, keep_layout: bool = True,
             filter_fn: Callable[[nn.Module, str], bool] | None = None,
             dtype: torch.dtype | None = None) -> nn.Module:
    """Replaces every masked Conv2d/Linear with :class:`SparseConv2d`/:class:`SparseLinear`.

    Args:
        model: any model; it is copied first unless ``inplace=True``.
        masks: ``graspext.Masks`` or a mapping ``"<layer>.weight" -> bool tensor`` (True = kept).
        policy: ``"auto"`` (cost model: on the CPU sparse below ``break_even_density``, on CUDA dense; a dense
            layer runs on its live channels only when dead channels remove ``COMPACT_MIN_SAVING`` of its work),
            ``"measure"`` (time the modes on each layer's input shape from ``example_input``, on the model's
            device), ``"sparse"``, ``"dense"`` or ``"compact"`` (forced).
        example_input: an input batch for ``policy="measure"``.
        keep_layout: also swap BatchNorm2d, pooling and unmasked Conv2d layers for subclasses that keep the
            sparse kernels' batch-innermost layout (same computation and state_dict), so layouts are converted
            once, and fuse each BatchNorm2d that a Sequential runs into a ReLU (the ReLU becomes ``FusedReLU``).
        filter_fn: ``filter_fn(module, name) -> bool`` to leave some masked layers alone.
        dtype: the dtype the model will train in, for the cost model and ``"measure"``: ``None`` for the
            weights' dtype, ``torch.bfloat16`` for ``torch.autocast(device, torch.bfloat16)`` (the choice
            between sparse and dense shifts there; "measure" times the candidates under that autocast, on the
            model's device).

    Returns the converted model; ``sparsity_report(model)`` lists each layer's density and choice.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if dtype not in (None, torch.bfloat16):
        raise ValueError(f"dtype must be None (the weights' dtype) or torch.bfloat16 (bfloat16 autocast), "
                         f"got {dtype!r}")
    if policy == "measure" and example_input is None:
        raise ValueError("policy='measure' needs example_input, a batch of the shape the model will train on")
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be graspext.Masks or a mapping of parameter name to bool tensor, "
                        f"got {type(masks).__name__}")
    targets: dict[str, tuple[nn.Module, Tensor]] = {}
    for param_name, mask in masks.items():
        module_name, module = _named_target(model, param_name)
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"masks[{param_name!r}] must be a bool tensor")
        if mask.shape != module.weight.shape:
            raise ValueError(f"masks[{param_name!r}] has shape {tuple(mask.shape)} but the weight has "
                             f"{tuple(module.weight.shape)}")
        if filter_fn is None or filter_fn(module, module_name):
            targets[module_name] = (module, mask)
    tied = {k: v for k, v in tied_weights(model, masks).items() if k.rpartition(".")[0] in targets}
    if tied:
        name, others = next(iter(tied.items()))
        raise ValueError(f"sparsify: {name} is shared with {', '.join(others)} (tied weights); a sparse layer holds "
                         "its own values, so converting it would untie them: leave it out with filter_fn, or train "
                         "the masks on the dense model (graspext.train(..., kernels='dense'))")
    if filter_fn is not None and masks and not targets:
        warnings.warn(f"sparsify: filter_fn rejected all {len(masks)} masked layers; the model is returned "
                      "without sparse layers", stacklevel=2)

    if inplace:
        _refuse_root_in_place(model, "" in targets, "sparsify")
    shapes = _layer_inputs(model, list(targets), example_input) if policy == "measure" else {}
    out = model if inplace else copy.deepcopy(model)
    converted = []
    for name, (_, mask) in targets.items():
        converted.append(_sparse_layer(out.get_submodule(name), mask, policy, shapes.get(name), dtype))
        out = _replace(out, name, converted[-1])
    if policy == "auto":
        _join_sparse_neighbours(converted, dtype)
    if keep_layout and targets:
        for name, module in list(out.named_modules()):
            swapped = to_layout_module(module)
            if swapped is not module:
                out = _replace(out, name, swapped)
        # A layer computed by dense torch (a sparse layer in dense mode, or an unmasked convolution) hands its
        # output batch-innermost to a sparse layer after it.
        layers = [m for m in out.modules() if isinstance(m, (SparseConv2d, SparseLinear, LayoutConv2d))]
        for layer, following in itertools.pairwise(layers):
            if isinstance(layer, SparseLinear):
                continue
            runs_dense = isinstance(layer, LayoutConv2d) or layer.mode != "sparse"
            into_sparse = isinstance(following, (SparseConv2d, SparseLinear)) and following.mode == "sparse"
            layer.emit_batch_innermost = runs_dense and into_sparse
            if isinstance(layer, SparseConv2d):
                layer.dense_channels_last = (dtype == torch.bfloat16 and layer.mode != "sparse"
                                             and not layer.emit_batch_innermost)
        fuse_batch_norm_relu(out)
    return out


def _sparse_layer(module: nn.Module, mask: Tensor, policy: str, input_shape: torch.Size | None,
                  dtype: torch.dtype | None) -> SparseConv2d | SparseLinear:
    mask = mask.to(module.weight.device)
    if isinstance(module, nn.Conv2d):
        layer, kind = SparseConv2d.from_dense(module, mask), "conv"
    else:
        layer, kind = SparseLinear.from_dense(module, mask), "linear"
    if layer.mode == "sparse":  # not already dense for lack of kernel support
        _choose_mode(layer, kind, policy, input_shape, dtype)
    return layer


def planned_modes(model: nn.Module, masks: Mapping[str, Tensor], *, policy: str = "auto",
                  dtype: torch.dtype | None = None) -> dict[str, str]:
    """``"<layer>.weight" -> mode``: what ``sparsify(model, masks, policy=policy, dtype=dtype)`` would run each
    masked layer in, without converting the model. ``policy="measure"`` is not predicted (it times the layers)."""
    return {name: layer.mode for name, layer in _planned_layers(model, masks, policy, dtype).items()}


def predicted_saving(model: nn.Module, masks: Mapping[str, Tensor], *, policy: str = "auto",
                     dtype: torch.dtype | None = None) -> float:
    """The cost model's estimate of the fraction of the masked layers' time that ``sparsify`` would save.

    A sparse layer saves ``1 - density / break-even`` of its dense time (sparse time grows linearly with density
    and meets dense at the break-even), a compact one its dead channels' share, a dense one nothing. Each layer
    counts alike: CIFAR-style networks spend about as many multiply-adds in each convolution (channels double
    where the image halves). The trainer's ``kernels="auto"`` sparsifies only above ``AUTO_MIN_SAVING``.
    """
    layers = _planned_layers(model, masks, policy, dtype)
    saved = 0.0
    for layer in layers.values():
        if layer.mode == "sparse":
            saved += max(0.0, 1 - layer.density / break_even_density(layer, dtype)[0])
        elif layer.mode == "compact":
            saved += 1 - layer.compact_mac_fraction
    return saved / max(1, len(layers))


def _planned_layers(model, masks, policy, dtype) -> dict[str, SparseConv2d | SparseLinear]:
    if policy not in POLICIES or policy == "measure":
        allowed = tuple(p for p in POLICIES if p != "measure")
        raise ValueError(f"policy must be one of {allowed} (measure times the layers: sparsify with it), "
                         f"got {policy!r}")
    layers = {}
    with torch.no_grad():
        for param_name, mask in masks.items():
            _, module = _named_target(model, param_name)
            layers[param_name] = _sparse_layer(module, mask, policy, None, dtype)
    if policy == "auto":
        _join_sparse_neighbours(list(layers.values()), dtype)
    return layers


def _join_sparse_neighbours(layers: list, dtype: torch.dtype | None) -> None:
    """The cost model's second pass, over the converted layers in model order: a convolution on the dense side
    of its break-even, between two sparse layers, runs sparse too while its density is under twice the break-even.
    Dense there, it would convert its input and its output between layouts (and a residual sum would mix them),
    which on CIFAR-sized networks costs more than the multiply-adds it saves (benchmarks/RESULTS.md, IMP rounds)."""
    for before, layer, after in zip(layers, layers[1:], layers[2:]):
        if not isinstance(layer, SparseConv2d) or layer.mode == "sparse" or layer.values.device.type != "cpu":
            continue
        if before.mode != "sparse" or after.mode != "sparse" or not layer.kernel_supported:
            continue
        limit, assumed = break_even_density(layer, dtype)
        if layer.density < 2 * limit:
            layer.mode = "sparse"
            layer.decision = (f"sparse (cost model, {assumed}: density {layer.density:.3f} < 2 x {limit:.2f} "
                              "between sparse layers, where dense would convert layouts)")


def _dense_or_compact(layer: nn.Module, why: str) -> tuple[str, str]:
    """The cost model's choice for a layer that runs on dense torch kernels."""
    dead_out, dead_in = layer.dead_channels
    saving = 1 - layer.compact_mac_fraction
    if layer.nnz > 0 and saving >= COMPACT_MIN_SAVING:
        return "compact", (f"compact (cost model: {why}; {dead_out} dead output and {dead_in} dead input channels "
                           f"remove {saving:.0%} of the dense work)")
    return "dense", f"dense (cost model: {why})"


def choose_mode_again(layer: nn.Module) -> None:
    """After a layer's pattern changed (``set_mask_``): its mode as ``sparsify`` would choose it now.

    The kept count is the same, so the density and the sparse/dense choice are too; the dead channels may differ,
    which moves a dense layer between ``"dense"`` and ``"compact"``. A measured choice is not timed again (that
    would cost a benchmark per update): only its dense/compact half follows the cost model.
    """
    policy, kind, dtype = layer.mode_rule
    if policy == "auto" and layer.mode != "sparse":  # a sparse layer stays sparse at the same density
        _choose_mode(layer, kind, policy, None, dtype)
    elif policy == "measure" and layer.mode != "sparse":
        layer.mode, decision = _dense_or_compact(layer, "measured dense; dead channels re-counted after a mask update")
        layer.decision = decision


def _choose_mode(layer: nn.Module, kind: str, policy: str, input_shape: torch.Size | None,
                 dtype: torch.dtype | None) -> None:
    layer.mode_rule = (policy, kind, dtype)
    density = layer.density
    if policy in ("sparse", "dense", "compact"):
        layer.mode, layer.decision = policy, f"{policy} (forced)"
    elif policy == "auto" and layer.values.device.type == "cuda":
        layer.mode, layer.decision = _dense_or_compact(
            layer, "on CUDA the sparse kernels beat cuDNN only for some shapes; policy='measure' times them")
    elif policy == "auto":
        limit, assumed = break_even_density(layer, dtype)
        if density < limit:
            layer.mode, layer.decision = "sparse", f"sparse (cost model, {assumed}: density {density:.3f} < {limit:.2f})"
        else:
            layer.mode, layer.decision = _dense_or_compact(layer, f"{assumed}: density {density:.3f} >= {limit:.2f}")
    elif input_shape is None:
        layer.mode, layer.decision = "dense", "dense (the example input never reached this layer)"
    else:
        times = _time_modes(layer, input_shape, dtype)
        layer.mode = min(times, key=times.get)
        listed = ", ".join(f"{mode} {ms:.2f} ms" for mode, ms in times.items())
        layer.decision = f"{layer.mode} (measured fwd+bwd{', bfloat16 autocast' if dtype else ''}: {listed})"


def densify(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replaces sparse layers by the equivalent ``nn.Conv2d``/``nn.Linear`` and the layout-keeping modules by
    their torch classes. The masks are not enforced afterwards: keep them (``graspext.Masks``) to train on."""
    if inplace:
        _refuse_root_in_place(model, isinstance(model, (SparseConv2d, SparseLinear)) or
                              from_layout_module(model) is not model, "densify")
    out = model if inplace else copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if isinstance(module, (SparseConv2d, SparseLinear)):
            out = _replace(out, name, module.to_dense())
        else:
            plain = from_layout_module(module)
            if plain is not module:
                out = _replace(out, name, plain)
    return out


def sparsity_report(model: nn.Module) -> list[LayerChoice]:
    """The sparse layers of ``model`` with their density, mode and why that mode was chosen."""
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, (SparseConv2d, SparseLinear)):
            kind = "conv" if isinstance(m, SparseConv2d) else "linear"
            dtype = str(m.computed_dtype).removeprefix("torch.") if m.computed_dtype is not None else None
            rows.append(LayerChoice(name, kind, m._dense_shape(), m.density, m.mode, m.decision, dtype))
    return rows


def format_sparsity_report(model: nn.Module) -> str:
    rows = sparsity_report(model)
    if not rows:
        return "no sparse layers"
    width = max(len(r.name) for r in rows)
    lines = [f"{'layer':<{width}}  {'shape':<20} {'density':>8}  {'ran in':<9} decision"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {str(r.weight_shape):<20} {r.density:>8.4f}  {r.dtype or 'not run':<9} "
                     f"{r.decision}")
    n_sparse = sum(r.mode == "sparse" for r in rows)
    n_compact = sum(r.mode == "compact" for r in rows)
    compact = f", {n_compact} {'runs' if n_compact == 1 else 'run'} dense kernels on the live channels only"
    lines.append(f"{n_sparse} of {len(rows)} layers use the sparse kernels" + (compact if n_compact else ""))
    return "\n".join(lines)
