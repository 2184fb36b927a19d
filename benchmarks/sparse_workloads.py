"""Workloads of the sparse-training benchmarks (per layer and end to end), shared by the pytest-benchmark
suites and ``ratios.py --sparse``.

Masks are GraSP's, scored on 100 random CIFAR-shaped images (10 per class) with the finite-difference
engine: per layer (``scope="layerwise"``, every layer exactly at the sparsity, with GraSP's uneven rows and
channels) for the layer benchmarks, global for the end-to-end steps (GraSP's uneven layer densities).
Both sides run with graspext.allocator.keep_freed_memory() in force, so neither pays the OS for
page-faulting fresh activations on every call.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import graspext as gx
from graspext.allocator import keep_freed_memory
from graspext.nn.layout import to_batch_innermost
from graspext.nn.pattern import SparsePattern

keep_freed_memory()

SPARSITIES = (0.90, 0.95, 0.98, 0.99)
MODELS = ("vgg19_bn", "resnet32_grasp")  # the paper's VGG19 and 2x-wide ResNet32 on CIFAR
BATCH = 128


def _scoring_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(10).repeat_interleave(10)
    return torch.randn(len(y), 3, 32, 32, generator=g), y


@functools.lru_cache(maxsize=None)
def model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return gx.models.create(name, num_classes=10)


@functools.lru_cache(maxsize=None)
def grasp_masks(name: str, sparsity: float, scope: str = "global") -> gx.Masks:
    # Every rank of a distributed benchmark scores alone (cached per process: a shared scoring would be a
    # collective that a rank with the masks cached never joins).
    return gx.prune(model(name), "grasp", sparsity, _scoring_data(), engine="finite_difference", scope=scope,
                    distributed=False)


def distinct_convs(net: torch.nn.Module, image: int, batch: int) -> dict[str, tuple]:
    """Distinct Conv2d configurations of ``net`` on ``image`` x ``image`` input: key -> (the first layer of it, its
    input shape at ``batch``); keys read ``"<in>-><out> k<kernel> s<stride> <height>x<width>"`` (of the input)."""
    found: dict[str, tuple] = {}
    hooks = []
    for layer_name, m in net.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            def hook(mod, args, layer_name=layer_name):
                x = args[0]
                key = (f"{mod.in_channels}->{mod.out_channels} k{mod.kernel_size[0]} s{mod.stride[0]} "
                       f"{x.shape[2]}x{x.shape[3]}")
                found.setdefault(key, (layer_name, (batch, *x.shape[1:])))
            hooks.append(m.register_forward_pre_hook(hook))
    was_training = net.training
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(2, 3, image, image))
    finally:
        for h in hooks:
            h.remove()
        net.train(was_training)
    return found


@functools.lru_cache(maxsize=None)
def conv_layers(name: str) -> dict[str, tuple]:
    """Distinct Conv2d configurations of a model at CIFAR input, batch BATCH: key -> (layer name, input shape)."""
    return distinct_convs(model(name), 32, BATCH)


class ConvCase:
    """One layer at one sparsity: a dense and a sparse forward+backward on the same data.

    ``ConvCase(model_name, key, sparsity)`` is a layer of the CIFAR models above (on the CPU);
    :meth:`from_layer` builds one from any Conv2d, its mask and its input shape, on any device.
    """

    def __init__(self, model_name: str, key: str, sparsity: float):
        layer_name, input_shape = conv_layers(model_name)[key]
        conv = model(model_name).get_submodule(layer_name)
        self._build(conv, grasp_masks(model_name, sparsity, "layerwise")[layer_name + ".weight"], input_shape, "cpu")

    @classmethod
    def from_layer(cls, conv: torch.nn.Conv2d, mask: torch.Tensor, input_shape, device="cpu") -> ConvCase:
        case = cls.__new__(cls)
        case._build(conv, mask, input_shape, torch.device(device))
        return case

    def _build(self, conv: torch.nn.Conv2d, mask: torch.Tensor, input_shape, device: torch.device) -> None:
        g = torch.Generator(device).manual_seed(1)  # drawn where they live: ImageNet activations are large
        mask = mask.to(device)
        self.needs_input_grad = input_shape[1] != 3  # the first layer's input is data
        self.x = torch.randn(input_shape, generator=g, device=device).requires_grad_(self.needs_input_grad)
        self.weight = (conv.weight.detach().to(device) * mask).requires_grad_()
        self.stride, self.padding = conv.stride, conv.padding
        self.pattern = SparsePattern.from_mask(mask)
        self.values = self.pattern.gather(self.weight.detach()).requires_grad_()
        # The output's shape, from meta tensors (no dense product computed for it).
        out_shape = F.conv2d(self.x.to("meta"), self.weight.to("meta"), None, self.stride, self.padding).shape
        self.grad = torch.randn(out_shape, generator=g, device=device)
        # The sparse layers hand each other batch-innermost tensors; so do their gradients.
        self.x_sparse = to_batch_innermost(self.x.detach())
        self.x_sparse.requires_grad_(self.needs_input_grad)
        self.grad_sparse = to_batch_innermost(self.grad)
        self.density = self.pattern.density
        # Dense torch on the live channels only (the "compact" mode), without bias as the other two.
        self.compact_layer = gx.nn.SparseConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                                conv.padding, conv.dilation, conv.groups, self.weight.detach(), None,
                                                mask, mode="compact")
        self.dead_channels = self.compact_layer.dead_channels
        # bfloat16: the kernels on bfloat16 activations with the float32 values (as under CPU autocast), and
        # dense torch under autocast in channels_last (oneDNN's bfloat16 path on CPUs, cuDNN's on GPUs).
        self.x_sparse_bf16 = self.x_sparse.detach().to(torch.bfloat16).requires_grad_(self.needs_input_grad)
        self.grad_sparse_bf16 = self.grad_sparse.to(torch.bfloat16)
        self.x_cl = self.x.detach().contiguous(memory_format=torch.channels_last)
        self.x_cl.requires_grad_(self.needs_input_grad)
        self.grad_cl = self.grad.contiguous(memory_format=torch.channels_last).to(torch.bfloat16)
        out_positions = out_shape[0] * out_shape[2] * out_shape[3]
        # Multiply-adds of a sparse forward+backward: forward, weight gradient and (but for the first layer)
        # input gradient, one per kept weight and output position.
        self.sparse_macs = (3 if self.needs_input_grad else 2) * self.pattern.nnz * out_positions
        self.dense_macs = (3 if self.needs_input_grad else 2) * mask.numel() * out_positions

    def dense(self) -> None:
        self.x.grad = self.weight.grad = None  # a layer's gradients are fresh tensors in training too
        F.conv2d(self.x, self.weight, None, self.stride, self.padding).backward(self.grad)

    def compact(self) -> None:
        self.x.grad = self.compact_layer.values.grad = None
        self.compact_layer(self.x).backward(self.grad)

    def sparse(self) -> None:
        self.x_sparse.grad = self.values.grad = None
        gx.ops.sparse_conv2d(self.x_sparse, self.values, self.pattern, None, self.stride,
                             self.padding).backward(self.grad_sparse)

    def sparse_bf16(self) -> None:
        """Under autocast: bfloat16 products with float32 accumulation, float32 values and their gradients."""
        self.x_sparse_bf16.grad = self.values.grad = None
        with torch.autocast(self.x.device.type, dtype=torch.bfloat16):
            y = gx.ops.sparse_conv2d(self.x_sparse_bf16, self.values, self.pattern, None, self.stride, self.padding)
        y.backward(self.grad_sparse_bf16)

    def compact_bf16(self) -> None:
        self.x_cl.grad = self.compact_layer.values.grad = None
        with torch.autocast(self.x.device.type, dtype=torch.bfloat16):
            y = self.compact_layer(self.x_cl)
        y.backward(self.grad_cl)

    def dense_bf16(self) -> None:
        self.x_cl.grad = self.weight.grad = None
        with torch.autocast(self.x.device.type, dtype=torch.bfloat16):
            y = F.conv2d(self.x_cl, self.weight, None, self.stride, self.padding)
        y.backward(self.grad_cl)


class LinearCase:
    """Linear 4096x4096 at batch 256: dense F.linear, graspext, and torch.sparse CSR (MKL)."""

    def __init__(self, sparsity: float, n: int = 256, features: int = 4096):
        g = torch.Generator().manual_seed(2)
        scores = torch.randn(features, features, generator=g).abs() * torch.rand(features, 1, generator=g)
        keep = int(round(features * features * (1 - sparsity)))
        mask = torch.zeros(features * features, dtype=torch.bool)
        mask[scores.flatten().topk(keep).indices] = True  # rows of uneven density, as pruning leaves them
        mask = mask.view(features, features)
        self.weight = (torch.randn(features, features, generator=g) * 0.01 * mask).requires_grad_()
        self.x = torch.randn(n, features, generator=g).requires_grad_()
        self.grad = torch.randn(n, features, generator=g)
        self.pattern = SparsePattern.from_mask(mask)
        self.values = self.pattern.gather(self.weight.detach()).requires_grad_()
        self.x_sparse = self.x.detach().t().contiguous().t().requires_grad_()
        self.grad_sparse = self.grad.t().contiguous().t()
        w = self.weight.detach()
        self.csr = w.to_sparse_csr()
        self.csr_t = w.t().contiguous().to_sparse_csr()
        self.density = self.pattern.density

    def dense(self) -> None:
        self.x.grad = self.weight.grad = None
        F.linear(self.x, self.weight).backward(self.grad)

    def sparse(self) -> None:
        self.x_sparse.grad = self.values.grad = None
        gx.ops.sparse_linear(self.x_sparse, self.values, self.pattern).backward(self.grad_sparse)

    def torch_csr(self) -> None:
        """Forward, input gradient and weight gradient at the kept positions, with torch.sparse CSR ops."""
        x = self.x.detach()
        torch.sparse.mm(self.csr, x.t())                              # Y^T = W X^T
        torch.sparse.mm(self.csr_t, self.grad.t())                    # dX^T = W^T dY^T
        torch.sparse.sampled_addmm(self.csr, self.grad.t(), x, beta=0.0)  # dW at kept positions


# The distinct BatchNorm2d inputs of VGG19-CIFAR at batch BATCH: (channels, height = width).
BATCH_NORM_SHAPES = ((64, 32), (128, 16), (256, 8), (512, 4), (512, 2))
# Those of ResNet-50 at 224x224 (batch 256), the largest of each stage.
BATCH_NORM_SHAPES_IMAGENET = ((64, 112), (256, 56), (512, 28), (1024, 14), (2048, 7))


class BatchNormCase:
    """BatchNorm2d then ReLU, forward and backward in training mode: torch's modules on NCHW (and channels_last)
    input against graspext's layout modules on batch-innermost input (how each meets its input in a network):
    the fused op on the CPU; on CUDA torch's kernels on a view of the same storage, or the fused op with
    GRASPEXT_CUDA_FUSED_BN=1."""

    def __init__(self, channels: int, size: int, batch: int = BATCH, device: str = "cpu"):
        from graspext.nn.layout import fuse_batch_norm_relu, to_layout_module

        g = torch.Generator(device).manual_seed(4)
        self.x = torch.randn(batch, channels, size, size, generator=g, device=device).requires_grad_()
        self.grad = torch.randn(batch, channels, size, size, generator=g, device=device)
        self.x_fused = to_batch_innermost(self.x.detach()).requires_grad_()
        self.grad_fused = to_batch_innermost(self.grad)
        self.x_cl = self.x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        self.grad_cl = self.grad.contiguous(memory_format=torch.channels_last)
        self.torch_modules = torch.nn.Sequential(torch.nn.BatchNorm2d(channels), torch.nn.ReLU(inplace=True))
        self.fused_modules = torch.nn.Sequential(*(to_layout_module(m) for m in
                                                   (torch.nn.BatchNorm2d(channels), torch.nn.ReLU(inplace=True))))
        fuse_batch_norm_relu(self.fused_modules)
        self.torch_modules.to(device)
        self.fused_modules.to(device)

    def torch(self) -> None:
        self.x.grad = None
        self.torch_modules(self.x).backward(self.grad)

    def torch_channels_last(self) -> None:
        self.x_cl.grad = None
        self.torch_modules(self.x_cl).backward(self.grad_cl)

    def fused(self) -> None:
        self.x_fused.grad = None
        self.fused_modules(self.x_fused).backward(self.grad_fused)


def _sparseprop_model(net: torch.nn.Module, masks: gx.Masks, input_shape) -> torch.nn.Module:
    """The masked model with SparseProp's sparse modules swapped in where SparseProp measures them faster."""
    import contextlib
    import io

    from sparseprop.utils import swap_modules_with_sparse

    with torch.no_grad():
        for name, mask in masks.items():
            net.get_submodule(name.rpartition(".")[0]).weight.mul_(mask)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints one line per layer
        return swap_modules_with_sparse(net, tuple(input_shape), inplace=True)


class StepCase:
    """One training step (forward, backward, SGD with momentum) of a model at CIFAR shapes, batch BATCH.

    ``sparsity=None`` is the dense model. ``amp`` runs the forward under ``torch.autocast(device, bfloat16)``
    (float32 master weights), ``channels_last`` stores the dense model's weights and input channels-last
    (oneDNN's fastest bfloat16 layout, AMX on CPUs that have it). ``library="sparseprop"`` trains the masked
    model after SparseProp's own ``swap_modules_with_sparse`` (float32; it keeps the layers it finds no faster
    dense), the peer CPU library.
    """

    def __init__(self, model_name: str, sparsity: float | None, device: str = "cpu", policy: str = "auto",
                 amp: bool = False, channels_last: bool = False, library: str = "graspext"):
        import copy

        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(BATCH, 3, 32, 32, generator=g).to(device)
        self.y = torch.randint(0, 10, (BATCH,), generator=g).to(device)
        self.device, self.amp = device, amp
        net = copy.deepcopy(model(model_name)).train().to(device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        if sparsity is not None and library == "sparseprop":
            net = _sparseprop_model(net, grasp_masks(model_name, sparsity), self.x.shape)
        elif sparsity is not None:
            net = gx.sparsify(net, grasp_masks(model_name, sparsity), policy=policy,
                              example_input=self.x if policy == "measure" else None,
                              dtype=torch.bfloat16 if amp else None)
        self.model = net
        self.opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.model(self.x)
        F.cross_entropy(logits.float(), self.y).backward()
        self.opt.step()

    def graphed_step(self):
        return graphed_step(self.step, lambda: F.cross_entropy(self.model(self.x), self.y).backward(), self.opt)


def step_to_time(case, graphs: bool):
    """``case.step``, or with ``graphs`` its CUDA-graph replay; a step whose capture fails is skipped with the error
    (recorded in the results, not hidden)."""
    if not graphs:
        return case.step
    try:
        return case.graphed_step()
    except RuntimeError as error:
        import pytest

        pytest.skip(f"CUDA graph capture failed: {error}")


def graphed_step(step, backward, opt: torch.optim.Optimizer):
    """A train step captured once as a CUDA graph (PyTorch's whole-network recipe: ``step`` three times on a side
    stream, so that optimizer state and cuDNN plans exist, then ``backward()`` and ``opt.step()`` captured with the
    gradients allocated inside the graph); returns the replay. Raises where capture fails."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        backward()
        opt.step()
    return graph.replay
