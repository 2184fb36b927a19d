"""The peer RigL for the benchmarks: PyPI ``rigl-torch`` (McCrearyD/rigl-torch), which trains densely and multiplies
by masks.

Written against rigl-torch 0.5.2 (the newest on PyPI; its wheel declares no dependencies although it imports torch,
numpy and torchvision: ``pip install --no-deps rigl-torch``). Line numbers below are into the installed
``rigl_torch/RigL.py`` and ``rigl_torch/util.py`` of 0.5.2.

API (RigL.py:46): ``RigLScheduler(model, optimizer, dense_allocation=1, T_end=None, sparsity_distribution='uniform',
ignore_linear_layers=True, delta=100, alpha=0.3, static_topo=False, grad_accumulation_n=1, state_dict=None)``.
The training loop the README prescribes is ``zero_grad; forward; loss; backward; if scheduler(): optimizer.step()``.

What it does:

* Layers (util.py:8-30): every module, found by recursing ``_modules`` in registration order, that has a ``weight``
  attribute and whose type is not exactly ``BatchNorm2d`` (so LayerNorm/GroupNorm/BatchNorm1d weights would count,
  and a module whose ``weight`` is None breaks it); ``nn.Linear`` is flagged linear. With ``'uniform'`` the first
  such layer is kept dense (RigL.py:78, unless it is the only one) and, with ``ignore_linear_layers=True`` (the
  constructor's default, although the README example passes False), every Linear is dense (RigL.py:81); the others
  get sparsity ``1 - dense_allocation``, ``int(S * numel)`` weights zeroed at random with the global torch RNG
  (``torch.randperm``, RigL.py:151-173; seed with ``torch.manual_seed`` before wrapping).
* Distributions: only ``'uniform'`` (RigL.py:116 asserts it). ``distribution="erk"`` (and ``keep_first_dense=False``)
  here is therefore *ours*: graspext's ``erk_densities`` over the same layers (less the first if
  ``keep_first_dense``, the default, as graspext.dst.initial_masks; less the Linear ones if
  ``ignore_linear_layers``), random masks drawn by rigl-torch's own ``random_sparsify``, handed to the constructor
  through its ``state_dict`` argument (RigL.py:61-63), which then registers the hooks for every sparse layer. From
  there on the training step is rigl-torch's code unchanged.
* Masking: a tensor hook on each sparse weight (RigL.py:10-32, 100-113) returns ``grad * mask``; ``optimizer.step``
  is replaced (RigL.py:35-41) by one that steps, then masks the momentum buffers and the weights. Forward and
  backward are dense.
* Schedule (RigL.py:267-275): ``scheduler()`` first increments ``step`` (1 on the first call), then on
  ``step % delta == 0 and step < T_end`` runs the mask update and returns False (no optimizer step on that
  iteration); otherwise True. So the first update is the ``delta``-th call (after ``delta - 1`` optimizer steps),
  the updates are at calls delta, 2*delta, ... strictly below T_end, never at step 0, and each one costs an
  iteration's optimizer step. ``static_topo=True`` returns True always (no updates).
* Drop fraction (RigL.py:263-264): ``alpha / 2 * (1 + cos(pi * step / T_end))`` with the post-increment step, so the
  k-th update uses ``step = k * delta``; ``n_prune = int(active * fraction)`` per layer (RigL.py:308).
* Update (RigL.py:279-356): drop the smallest ``|w|``, grow the largest ``|dense grad|`` among the rest (full
  ``topk(k=numel)`` sorts, a ``.item()`` per layer), grown weights start at 0 (so just after an update the weight
  has fewer nonzeros than the mask, until the next optimizer step). The dense gradient is what the hook saw on the
  backward pass(es) of the ``grad_accumulation_n`` iterations ending at the update one (RigL.py:250-260; the update
  iteration's own backward included), averaged. The trailing ``reset_momentum / apply_mask_to_weights /
  apply_mask_to_gradients`` (RigL.py:354-356) sit inside the per-layer loop: every update re-masks all layers once
  per sparse layer (quadratic in the layer count).

Differences from Google's TF1 RigL (google-research/rigl, ``sparse_optimizers_base.py``): there the first update is
at global step ``begin_step`` (0 by default; ``last_mask_update_step`` starts at ``-frequency``, lines 166-169),
updates run while ``global_step <= end_step`` (inclusive, line 219), the cosine is ``cosine_decay(drop_fraction,
global_step, end_step - begin_step)`` on the raw global step (line 238, full ``drop_fraction`` at step 0), a small
noise (std 1e-5) breaks drop-score ties, ``'erdos_renyi_kernel'`` is available, and the update replaces the
optimizer's apply_gradients (lines 487-521, so no optimizer step there either; the global step is incremented only
by that apply_gradients). rigl-torch starts at step ``delta``, stops strictly below ``T_end``, anneals on its own call
counter (the update iterations included), adds no noise, and knows only ``'uniform'`` (first layer dense).

Pitfalls (checked against 0.5.2 and torch 2.14):

* ``T_end`` has no usable default: ``None`` makes the first backward raise TypeError (RigL.py:256).
* Checks run after side effects: a bad ``sparsity_distribution`` or ``grad_accumulation_n >= delta`` fails the
  asserts at RigL.py:115-116 after the weights were sparsified, the hooks registered and ``optimizer.step`` wrapped,
  and the model then cannot be wrapped again ("already has been registered"). rigl_torch_step validates first.
* Masks are created on the weights' device at construction (RigL.py:164) and never moved: put the model on its
  device before wrapping (rigl_torch_step moves it to ``x.device``).
* channels_last breaks the first mask update: ``score_drop.view(-1)`` (RigL.py:312, also ``score_grow.view(-1)`` at
  RigL.py:320) raises on a channels_last weight or gradient. rigl_torch_step makes the sparse weights and their
  dense gradients contiguous just for an update iteration and restores channels_last afterwards (a copy per
  weight per update; other iterations run untouched).
* The wrapped ``optimizer.step`` takes no arguments (``optimizer.step(closure)`` raises TypeError).
* Serialization: ``torch.save(model)`` / ``pickle`` drop the tensor hooks but keep the ``_has_rigl_backward_hook``
  attribute, so a loaded model trains densely *and* refuses a new scheduler; ``copy.deepcopy(model)`` drops both
  (masked zeros, no hooks). A pickled scheduler loses its hooks and the optimizer wrapper. ``scheduler.state_dict()``
  holds references to the live mask tensors (not copies); passing it to the constructor overrides the
  constructor's dense_allocation / T_end / delta silently (the ``grad_accumulation_n < delta`` assert still uses the
  argument).
"""

from __future__ import annotations

import contextlib
import functools
import math
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F

DISTRIBUTIONS = ("uniform", "erk")


@functools.cache
def rigl_torch_available() -> bool:
    """Whether ``rigl_torch.RigL`` imports (it needs numpy and torchvision, which its wheel does not declare)."""
    try:
        import rigl_torch.RigL  # noqa: F401
    except ImportError:
        return False
    return True


def rigl_torch_version() -> str:
    """The installed rigl-torch version (the package has no ``__version__``; read from its distribution metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rigl-torch")
    except PackageNotFoundError:
        raise ModuleNotFoundError("rigl-torch is not installed (pip install --no-deps rigl-torch)") from None


def _check(dense_allocation, delta, t_end, grad_accumulation_n, distribution, alpha):
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if isinstance(dense_allocation, bool) or not isinstance(dense_allocation, (int, float)) \
            or not 0 < dense_allocation <= 1:
        raise ValueError(f"dense_allocation must be in (0, 1], got {dense_allocation!r}")
    for name, v, lo in (("delta", delta, 2), ("t_end", t_end, 1), ("grad_accumulation_n", grad_accumulation_n, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if grad_accumulation_n >= delta:
        raise ValueError(f"rigl-torch needs grad_accumulation_n < delta, got {grad_accumulation_n} >= {delta}")
    if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")


def _initial_state(model, distribution, keep_first_dense, dense_allocation, delta, t_end, alpha, static_topo,
                   grad_accumulation_n, ignore_linear_layers):
    """A fresh rigl-torch scheduler state with our layer densities (rigl-torch itself knows only 'uniform' with the
    first layer dense): ERK or uniform over the layers it finds, less the Linear ones if ``ignore_linear_layers``
    and the first one if ``keep_first_dense``."""
    from rigl_torch.RigL import RigLScheduler
    from rigl_torch.util import get_W

    from graspext.pruning.selection import erk_densities

    W, linear = get_W(model, return_linear_layers_mask=True)
    eligible = [i for i, is_linear in enumerate(linear)
                if not (is_linear and ignore_linear_layers) and not (i == 0 and keep_first_dense)]
    densities = (erk_densities([tuple(W[i].shape) for i in eligible], float(dense_allocation))
                 if distribution == "erk" else [float(dense_allocation)] * len(eligible))
    S = [0.0] * len(W)
    for i, d in zip(eligible, densities):
        S[i] = 1.0 - d
    N = [w.numel() for w in W]
    drawn = types.SimpleNamespace(W=W, N=N, S=S)
    RigLScheduler.random_sparsify(drawn)  # rigl-torch's own random masks (zeroes the weights too)
    return {
        "dense_allocation": dense_allocation, "S": S, "N": N,
        # 'uniform' is only the label its constructor asserts (RigL.py:116); S above is what counts.
        "hyperparams": {"delta_T": delta, "alpha": alpha, "T_end": t_end, "ignore_linear_layers": ignore_linear_layers,
                        "static_topo": static_topo, "sparsity_distribution": "uniform",
                        "grad_accumulation_n": grad_accumulation_n},
        "step": 0, "rigl_steps": 0, "backward_masks": drawn.backward_masks, "_linear_layers_mask": linear,
    }


def _will_update(s) -> bool:
    """Whether the next ``scheduler()`` call runs a mask update (RigL.py:268-271)."""
    nxt = s.step + 1
    return not s.static_topo and nxt % s.delta_T == 0 and nxt < s.T_end


@contextlib.contextmanager
def _contiguous_for_update(s):
    """rigl-torch's update ``.view(-1)`` s the weights and dense gradients (RigL.py:312, 320): give it contiguous ones
    for that iteration only and put the weights back in their memory format afterwards."""
    restore = []
    for w, hook, sparsity in zip(s.W, s.backward_hook_objects, s.S):
        if sparsity <= 0 or hook is None:
            continue
        if hook.dense_grad is not None and not hook.dense_grad.is_contiguous():
            hook.dense_grad = hook.dense_grad.contiguous()
        if not w.is_contiguous():
            fmt = torch.channels_last if w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last) \
                else torch.contiguous_format
            restore.append((w, fmt))
            w.data = w.data.contiguous()
    try:
        yield
    finally:
        for w, fmt in restore:
            w.data = w.data.contiguous(memory_format=fmt)


def rigl_torch_step(model: torch.nn.Module, dense_allocation: float, delta: int, t_end: int, x: torch.Tensor,
                    y: torch.Tensor, *, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
                    amp_bf16: bool = False, channels_last: bool = False, distribution: str = "erk",
                    keep_first_dense: bool = True, alpha: float = 0.3, grad_accumulation_n: int = 1,
                    ignore_linear_layers: bool = True, static_topo: bool = False) -> Callable[[], None]:
    """Wrap ``model`` (in place: moved to ``x.device``, sparsified, hooked) with rigl-torch's RigLScheduler and
    SGD(lr, momentum, weight_decay); return a closure running ONE training step as rigl-torch's README prescribes.

    ``amp_bf16`` runs the forward under ``torch.autocast(x.device.type, bfloat16)`` (float32 weights, the loss in
    float32, as the project's own benchmark steps do); ``channels_last`` stores the model and ``x`` channels-last.
    ``distribution="uniform"`` with ``keep_first_dense=True`` is rigl-torch's own initialization; ``"erk"`` (ERK over
    the sparse layers, the first kept dense by default as graspext.dst.initial_masks does) and
    ``keep_first_dense=False`` are ours, handed to rigl-torch as its initial state (module docstring).
    ``ignore_linear_layers`` (rigl-torch's default True) keeps ``nn.Linear`` layers dense; graspext.dst's masks prune
    the classifier, so pass False for like-for-like runs. Masks are drawn with the global torch RNG. The closure
    carries ``.scheduler``, ``.optimizer``, ``.model``, ``.x``, ``.y``.
    """
    if not rigl_torch_available():
        raise ModuleNotFoundError("rigl-torch is not installed (pip install --no-deps rigl-torch)")
    from rigl_torch.RigL import RigLScheduler
    from rigl_torch.util import get_W

    _check(dense_allocation, delta, t_end, grad_accumulation_n, distribution, alpha)
    weights = get_W(model)
    if any(w is None for w in weights):
        raise ValueError("rigl-torch would take a module whose weight is None as a layer (util.py:22)")
    if any(getattr(w, "_has_rigl_backward_hook", False) for w in weights):
        raise ValueError("this model was already wrapped by a RigLScheduler (or is a torch.load of one)")
    if channels_last and x.dim() != 4:
        raise ValueError(f"channels_last needs a 4-d input, got shape {tuple(x.shape)}")

    model.train().to(x.device)
    y = y.to(x.device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    kwargs = {"dense_allocation": dense_allocation, "T_end": t_end, "delta": delta, "alpha": alpha,
              "static_topo": static_topo, "grad_accumulation_n": grad_accumulation_n,
              "ignore_linear_layers": ignore_linear_layers}
    if distribution == "uniform" and keep_first_dense:  # rigl-torch's own initialization (RigL.py:72-89)
        scheduler = RigLScheduler(model, optimizer, sparsity_distribution="uniform", **kwargs)
    else:
        state = _initial_state(model, distribution, keep_first_dense, dense_allocation, delta, t_end, alpha,
                               static_topo, grad_accumulation_n, ignore_linear_layers)
        scheduler = RigLScheduler(model, optimizer, state_dict=state, **kwargs)
    device_type = x.device.type

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp_bf16):
            logits = model(x)
        F.cross_entropy(logits.float(), y).backward()
        ctx = _contiguous_for_update(scheduler) if _will_update(scheduler) else contextlib.nullcontext()
        with ctx:
            take_step = scheduler()
        if take_step:
            optimizer.step()

    step.scheduler, step.optimizer, step.model, step.x, step.y = scheduler, optimizer, model, x, y
    step.distribution = distribution
    return step


if __name__ == "__main__":
    import statistics
    import time

    import graspext.models

    if not rigl_torch_available():
        raise SystemExit("rigl-torch is not installed")
    print(f"rigl-torch {rigl_torch_version()}, torch {torch.__version__}")
    DENSE, DELTA, T_END, STEPS = 0.1, 2, 10, 6
    for distribution, amp, cl in (("erk", False, False), ("uniform", False, False), ("erk", True, False),
                                  ("erk", False, True), ("uniform", True, True)):
        torch.manual_seed(0)
        net = graspext.models.create("vgg11_bn")
        g = torch.Generator().manual_seed(1)
        xb, yb = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        fn = rigl_torch_step(net, DENSE, DELTA, T_END, xb, yb, amp_bf16=amp, channels_last=cl,
                             distribution=distribution)
        s = fn.scheduler
        names = {id(p): n for n, p in net.named_parameters()}
        before = [None if m is None else m.clone() for m in s.backward_masks]
        times, updates = [], []
        for i in range(STEPS):
            r0 = s.rigl_steps
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            if s.rigl_steps > r0:
                updates.append(s.step)
        plain = [t for i, t in enumerate(times, 1) if i not in updates]
        upd = [t for i, t in enumerate(times, 1) if i in updates]
        print(f"\n[{distribution}, amp_bf16={amp}, channels_last={cl}] update calls {updates} "
              f"(scheduler.step={s.step}, rigl_steps={s.rigl_steps}); median step "
              f"{statistics.median(times) * 1e3:.1f} ms (optimizer steps {statistics.median(plain) * 1e3:.1f} ms, "
              f"update steps {statistics.median(upd) * 1e3:.1f} ms; all: {', '.join(f'{t * 1e3:.0f}' for t in times)})")
        total = kept = 0
        for w, mask, sp, m0 in zip(s.W, s.backward_masks, s.S, before):
            if sp <= 0:
                print(f"  {names[id(w)]:<22} dense")
                continue
            target = 1 - int(sp * w.numel()) / w.numel()
            mask_d = mask.float().mean().item()
            assert int(mask.sum()) == w.numel() - int(sp * w.numel()), "mask density drifted"
            assert not (w.detach()[~mask] != 0).any(), "nonzero weight outside the mask"
            changed = (mask != m0).sum().item() // 2
            print(f"  {names[id(w)]:<22} target {target:.4f} mask {mask_d:.4f} weight nonzeros "
                  f"{(w.detach() != 0).float().mean().item():.4f} moved {changed} "
                  f"channels_last={w.is_contiguous(memory_format=torch.channels_last) and w.dim() == 4}")
            total += w.numel()
            kept += int(mask.sum())
        print(f"  sparse layers: {kept}/{total} kept ({kept / total:.4f})")
