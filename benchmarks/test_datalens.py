"""DataLens's generator step (teacher gradients for every generated sample, TopAgg, the generator's Adam step)
and the whole training step (with the teachers' Adam steps), on the shipped digits config and at MNIST's shape
(28x28, the official networks, k = 300) with 95 teachers of 15 examples each, the official batch of 15 samples
(the digits upsampled; time grows linearly with the teachers, and the official 4000 need a large GPU).

The baseline for the teacher gradients is what the official code does: one discriminator call per teacher
(here 1-teacher ensembles, the same arithmetic), against the batched ensemble.
``ratios.py --datalens`` prints interleaved medians.

Run: python -m pytest benchmarks/test_datalens.py --benchmark-group-by=group
"""

import pytest
import torch
import torch.nn.functional as F

from graspext.datalens.config import DataLensConfig, load_datalens_config
from graspext.datalens.models import TeacherEnsemble, one_hot
from graspext.datalens.trainer import DataLens

WORKLOADS = {
    "digits-eps10": lambda: load_datalens_config("digits-datalens-eps10"),
    "mnist-shape-T95": lambda: DataLensConfig(**{**load_datalens_config("mnist-datalens-eps10").to_dict(),
                                                  "dataset": "digits", "image_size": 28, "teachers": 95}),
}


def make_run(name: str) -> DataLens:
    cfg = WORKLOADS[name]()
    cfg.noise_seed = 0
    run = DataLens(cfg, progress=False)
    run.train_step()  # past the first epoch's extra teacher steps
    return run


def step_inputs(run: DataLens):
    g = torch.Generator().manual_seed(0)
    z = torch.rand(run.batch_size, run.config.z_dim, generator=g) * 2 - 1
    return z, torch.randint(10, (run.batch_size,), generator=g)


def per_teacher_loop(run: DataLens):
    """Teacher gradients one teacher at a time, as the official loop asks each teacher's graph in turn."""
    singles = []
    ens = run.teachers
    for t in range(ens.teachers):
        one = TeacherEnsemble(1, ens.classes, ens.channels, ens.height, ens.width, df=run.config.df,
                              dfc=run.config.dfc)
        with torch.no_grad():
            for (name, p), q in zip(ens.named_parameters(), one.parameters()):
                q.copy_(p[:, t:t + 1] if name.startswith("bn") else p[t:t + 1])
        singles.append(one)

    def grads(fake, labels):
        y = one_hot(labels, 10)
        rows = []
        for one in singles:
            x = fake.detach().clone().requires_grad_(True)
            logits = one(x, y)
            (g,) = torch.autograd.grad(F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)), x)
            rows.append(-g.flatten(1))
        return torch.stack(rows, 1)
    return grads


@pytest.fixture(scope="module", params=sorted(WORKLOADS))
def run(request):
    return request.param, make_run(request.param)


def test_train_step(benchmark, run):
    name, r = run
    benchmark.group = f"DataLens {name}: whole step"
    benchmark.pedantic(r.train_step, rounds=3, warmup_rounds=1)


def test_generator_step(benchmark, run):
    name, r = run
    z, labels = step_inputs(r)
    benchmark.group = f"DataLens {name}: generator step"
    benchmark.pedantic(lambda: r._generator_step(z, labels, 0), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["ensemble", "per_teacher_loop"])
def test_teacher_gradients(benchmark, run, impl):
    name, r = run
    z, labels = step_inputs(r)
    with torch.no_grad():
        fake = r.generator(z, one_hot(labels, 10))
    loop = per_teacher_loop(r) if impl == "per_teacher_loop" else None
    fn = (lambda: r.teacher_gradients(fake, labels)) if loop is None else (lambda: loop(fake, labels))
    benchmark.group = f"DataLens {name}: teacher gradients"
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
