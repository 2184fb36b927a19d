"""The DataLens trainer: teacher discriminators on disjoint data, a generator taught only by their TopAgg votes.

One generator step (AI-secure/DataLens ``model.py``, ``train_together``, with ``--signsgd --stochastic``):

1. Every teacher takes ``d_steps`` Adam steps (``pretrain_d_steps`` in the first epoch) on its own real batch
   against ``G(z, y)`` drawn with its batch's labels.
2. The generator draws a batch ``G(z, y)`` with random labels; each teacher returns ``-∂L_G/∂G(z)`` (its
   non-saturating generator loss, averaged over the batch) for every sample.
3. Per sample, TopAgg turns the T teachers' gradients into one vote in {-1, 0, 1}^d (``graspext.ops.topagg``,
   layout ``[samples, teachers, d]``): one query per generated sample, ``batch_size`` queries per step, exactly
   as the official loop calls ``signsgd_aggregate`` once per sample ``j``.
4. ``target = G(z) + vote_step · vote``; one Adam step on ``Σ (target - G(z))²``.

Privacy: the accountant is consulted before a step; a step whose queries would take ε past ``max_eps`` is not
taken, so the reported ε never exceeds ``max_eps`` (the official loop spends the step, then notices).

Randomness: the public draws (initialisation, each epoch's batch order, each step's z and labels) come from
generators seeded by (``seed``, step), and TopAgg's noise from (``noise_seed``, step), so a run resumed from a
checkpoint repeats the killed run bit for bit. A step redone after a kill repeats the same answer rather than a
fresh draw, and the accountant, saved with every checkpoint, counts it once: a resumed run never spends more
than an uninterrupted one. ``noise_seed`` is secret (whoever knows it can subtract the noise): by default it is
drawn from the operating system and kept only in the checkpoint.

Each example is seen by exactly one teacher (:func:`graspext.datalens.data.class_balanced_partition`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from graspext import _io
from graspext.datalens.config import DataLensConfig
from graspext.datalens.data import class_balanced_partition, load_images
from graspext.datalens.models import Generator, TeacherEnsemble, one_hot
from graspext.datalens.privacy import TopAggAccountant
from graspext.ops.topagg import _splitmix64_int, topagg

CHECKPOINT = "checkpoint.pt"
CLASSES = 10
# Streams of the public randomness, mixed with the seed and a counter.
_INIT, _EPOCH, _STEP, _NOISE = 1, 2, 3, 4
# Settings a run may change on resume; any other difference means the checkpoint belongs to another run.
_RESUMABLE = {"name", "max_epochs", "checkpoint_every", "evaluate", "noise_seed"}


def derive_seed(seed: int, *counters: int) -> int:
    """A seed in [0, 2**63) for (``seed``, counters...), by chained splitmix64."""
    x = seed & ((1 << 64) - 1)
    for c in counters:
        x = _splitmix64_int(x ^ _splitmix64_int(c & ((1 << 64) - 1)))
    return x >> 1


def _generator(seed: int, *counters: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *counters))


class DataLensCallback:
    """Hooks into :class:`DataLens`'s loop."""

    def on_step_end(self, trainer: DataLens, record: dict[str, Any]) -> None:
        """After each generator step, with that step's record (the one written to ``history.csv``)."""


@dataclass
class DataLensResult:
    steps: int
    epochs: float
    queries: int
    epsilon: float
    delta: float
    stopped: str                      # "max_eps" (the budget), "max_epochs", or "running" (not finished yet)
    batch_size: int
    history: list[dict[str, Any]] = field(default_factory=list)


class DataLens:
    """``DataLens(config, out_dir=None).fit()`` trains the generator; ``generate(n)`` then draws labelled samples.

    ``out_dir`` holds ``checkpoint.pt`` (every ``config.checkpoint_every`` steps and at the end; it contains the
    secret noise seed), ``results.json`` and ``history.csv``; a run with the same config resumes from it.
    """

    def __init__(self, config: DataLensConfig, out_dir: str | None = None, *, data_root: str | None = None,
                 download: bool = False, device: str | torch.device | None = None, progress: bool = True,
                 callbacks: Sequence[DataLensCallback] = (), resume: bool = True):
        if not isinstance(config, DataLensConfig):
            raise TypeError(f"config must be a DataLensConfig, got {type(config).__name__}")
        self.config, self.out_dir, self.progress, self.resume = config, out_dir, progress, resume
        self.callbacks = list(callbacks)
        self.device = torch.device(device or "cpu")
        c = config
        images, labels = load_images(c.dataset, True, c.image_size, data_root, download)
        self.partitions = class_balanced_partition(labels, c.teachers, seed=c.seed)
        sizes = torch.tensor([len(p) for p in self.partitions])
        self.batch_size = min(c.batch_size, int(sizes.min()))  # the official code caps it the same way
        self.steps_per_epoch = int(sizes.min()) // self.batch_size
        table = torch.zeros(c.teachers, int(sizes.max()), dtype=torch.int64)
        for t, p in enumerate(self.partitions):
            table[t, :len(p)] = p
        self._table, self._sizes = table, sizes
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        shape = {"classes": CLASSES, "channels": images.shape[1], "height": images.shape[2], "width": images.shape[3]}
        init = _generator(c.seed, _INIT)
        self.generator = Generator(c.z_dim, gf=c.gf, gfc=c.gfc, **shape)
        self.generator.reset_parameters(init)
        self.teachers = TeacherEnsemble(c.teachers, df=c.df, dfc=c.dfc, **shape)
        self.teachers.reset_parameters(init)
        self.generator.to(self.device)
        self.teachers.to(self.device)
        betas = (c.beta1, 0.999)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=c.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.teachers.parameters(), lr=c.lr, betas=betas)
        self.accountant = TopAggAccountant(c.sigma, c.k, c.delta)
        self._budget_steps: int | None = None  # budget_steps(), computed on first use
        self.noise_seed = c.noise_seed if c.noise_seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self._order: Tensor | None = None

    # ------------------------------------------------------------------ checkpoints
    def _path(self, name: str) -> str | None:
        return None if self.out_dir is None else os.path.join(self.out_dir, name)

    def _run_settings(self) -> dict[str, Any]:
        return {k: v for k, v in self.config.to_dict().items() if k not in _RESUMABLE}

    def state_dict(self) -> dict[str, Any]:
        return {"settings": self._run_settings(), "step": self.step, "noise_seed": self.noise_seed,
                "generator": self.generator.state_dict(), "teachers": self.teachers.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "accountant": self.accountant.state_dict(), "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self._run_settings()
        diff = sorted(k for k in set(mine) | set(state["settings"]) if mine.get(k) != state["settings"].get(k))
        if diff:
            shown = ", ".join(f"{k}: checkpoint {state['settings'].get(k)!r}, this run {mine.get(k)!r}" for k in diff)
            raise ValueError(f"the checkpoint in {self.out_dir} belongs to another run ({shown}); "
                             "use another out_dir or resume=False")
        if self.config.noise_seed is not None and self.config.noise_seed != state["noise_seed"]:
            raise ValueError("noise_seed differs from the checkpoint's: resuming with another noise seed would "
                             "spend the budget twice")
        self.generator.load_state_dict(state["generator"])
        self.teachers.load_state_dict(state["teachers"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.accountant.load_state_dict(state["accountant"])
        self.noise_seed, self.step, self.history = int(state["noise_seed"]), int(state["step"]), list(state["history"])

    def _save(self) -> None:
        path = self._path(CHECKPOINT)
        if path is None:
            return
        state = self.state_dict()
        _io.atomic_write(path, lambda f: torch.save(state, f))
        self._write_results()

    def _maybe_resume(self) -> None:
        path = self._path(CHECKPOINT)
        if path is not None and self.resume and os.path.isfile(path):
            self.load_state_dict(torch.load(path, map_location=self.device, weights_only=False))

    # ------------------------------------------------------------------ one step
    def _real_batch(self, step: int) -> tuple[Tensor, Tensor]:
        """Each teacher's real batch for ``step``: its partition in a per-epoch order, ``batch_size`` at a time."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if i == 0 or self._order is None:
            keys = torch.rand(self._table.shape, generator=_generator(self.config.seed, _EPOCH, epoch))
            keys[torch.arange(self._table.shape[1]) >= self._sizes[:, None]] = 2.0  # padding sorts last
            self._order = self._table.gather(1, keys.argsort(1))
        ids = self._order[:, i * self.batch_size:(i + 1) * self.batch_size].to(self.device)
        return self.images[ids], self.labels[ids]

    def _train_teachers(self, z: Tensor, real: Tensor, labels: Tensor, steps: int) -> float:
        t, b = labels.shape
        y = one_hot(labels, CLASSES)
        with torch.no_grad():  # each teacher's fakes carry its own batch's labels, as in the official graph
            fake = self.generator(z.repeat(t, 1), y.view(t * b, -1), groups=t).view(t, b, *real.shape[2:])
        loss = torch.zeros(())
        for _ in range(steps):
            real_logits, fake_logits = self.teachers(real, y), self.teachers(fake, y)
            per_teacher = (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits),
                                                              reduction="none").mean(1)
                           + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits),
                                                                reduction="none").mean(1))
            loss = per_teacher.sum()
            self.opt_d.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_d.step()
        return float(loss.detach()) / t

    def teacher_gradients(self, fake: Tensor, labels: Tensor) -> tuple[Tensor, float]:
        """``[B, T, d]``: every teacher's ``-∂L_G/∂x`` at each sample of ``fake`` (``[B, C, H, W]``), with the
        teachers' mean generator loss."""
        t, b = self.config.teachers, fake.shape[0]
        x = fake.detach().unsqueeze(0).expand(t, *fake.shape).contiguous().requires_grad_(True)
        logits = self.teachers(x, one_hot(labels, CLASSES))
        loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none").mean(1).sum()
        (grad,) = torch.autograd.grad(loss, x)
        return grad.neg_().view(t, b, -1).transpose(0, 1).contiguous(), float(loss.detach()) / t

    def _generator_step(self, z: Tensor, labels: Tensor, step: int) -> dict[str, float]:
        c = self.config
        fake = self.generator(z, one_hot(labels, CLASSES))
        grads, teacher_g_loss = self.teacher_gradients(fake, labels)
        votes, _ = topagg(grads, c.k, c.max_grad, c.sigma, c.beta, derive_seed(self.noise_seed, _NOISE, step))
        self.accountant.step(len(labels))
        target = fake.detach() + c.vote_step * votes.view_as(fake).to(fake.dtype)
        loss = (target - fake).square().sum()
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()
        return {"teacher_g_loss": teacher_g_loss, "agreed": float(votes.ne(0).float().mean())}

    def train_step(self) -> dict[str, Any]:
        """One generator step (with its teacher steps); returns its record."""
        c, step = self.config, self.step
        start = time.perf_counter()
        epoch = step // self.steps_per_epoch
        real, real_labels = self._real_batch(step)
        g = _generator(c.seed, _STEP, step)
        z = (torch.rand(self.batch_size, c.z_dim, generator=g) * 2 - 1).to(self.device)
        labels = torch.randint(CLASSES, (self.batch_size,), generator=g).to(self.device)
        d_loss = self._train_teachers(z, real, real_labels, c.pretrain_d_steps if epoch == 0 else c.d_steps)
        record = {"step": step + 1, "epoch": epoch + 1, "d_loss": d_loss}
        record.update(self._generator_step(z, labels, step))
        self.step += 1
        record.update(queries=self.accountant.queries, epsilon=self.accountant.epsilon(),
                      seconds=time.perf_counter() - start)
        self.history.append(record)
        return record

    # ------------------------------------------------------------------ the loop
    def budget_steps(self) -> int:
        """How many generator steps the privacy budget allows in all (a bisection over the accountant, once)."""
        if self._budget_steps is None:
            self._budget_steps = self.accountant.queries_within(self.config.max_eps) // self.batch_size
        return self._budget_steps

    def fit(self) -> DataLensResult:
        c = self.config
        if self.out_dir is not None:
            os.makedirs(self.out_dir, exist_ok=True)
        self._maybe_resume()
        total = min(self.budget_steps(), c.max_epochs * self.steps_per_epoch)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, initial=self.step, desc=f"DataLens {c.name}", leave=False)
        try:
            while self.step < total:
                record = self.train_step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(eps=f"{record['epsilon']:.3f}", agreed=f"{record['agreed']:.3f}")
                if self.step % c.checkpoint_every == 0:
                    self._save()
                for cb in self.callbacks:
                    cb.on_step_end(self, record)
        finally:
            if bar is not None:
                bar.close()
        self._save()
        return self.result()

    def result(self) -> DataLensResult:
        if self.step >= self.budget_steps():
            stopped = "max_eps"
        elif self.step >= self.config.max_epochs * self.steps_per_epoch:
            stopped = "max_epochs"
        else:
            stopped = "running"
        return DataLensResult(steps=self.step, epochs=self.step / self.steps_per_epoch,
                              queries=self.accountant.queries, epsilon=self.accountant.epsilon(),
                              delta=self.config.delta, stopped=stopped, batch_size=self.batch_size,
                              history=list(self.history))

    def _write_results(self) -> None:
        result = dataclasses.asdict(self.result())
        history = result.pop("history")
        config = self.config.to_dict()
        config.pop("noise_seed")  # secret
        summary = {"config": config, "teachers": self.config.teachers,
                   "examples_per_teacher": [int(self._sizes.min()), int(self._sizes.max())],
                   "steps_per_epoch": self.steps_per_epoch, "budget_steps": self.budget_steps(), **result}
        _io.write_text(self._path("results.json"), json.dumps(summary, indent=2) + "\n")
        if history:
            _io.write_text(self._path("history.csv"), _io.csv_text(history))

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        """``n`` samples, class-balanced labels in a seeded order, drawn in batches of ``batch_size`` (the
        generator's batch norm always uses batch statistics, as in training). Returns float32 images
        ``[n, C, H, W]`` and int64 labels, on the CPU."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % CLASSES
        labels = labels[torch.randperm(n, generator=g)]
        z = torch.rand(n, self.config.z_dim, generator=g) * 2 - 1
        out = []
        for i in range(0, n, self.batch_size):
            zb, yb = z[i:i + self.batch_size].to(self.device), labels[i:i + self.batch_size].to(self.device)
            out.append(self.generator(zb, one_hot(yb, CLASSES)).cpu())
        return torch.cat(out), labels


def load_trained(out_dir: str, config: DataLensConfig, *, data_root: str | None = None, download: bool = False,
                 device: str | torch.device | None = None) -> DataLens:
    """The DataLens run saved in ``out_dir`` (its checkpoint must exist)."""
    if not os.path.isfile(os.path.join(out_dir, CHECKPOINT)):
        raise FileNotFoundError(f"no {CHECKPOINT} in {out_dir}: train first (graspext datalens train)")
    run = DataLens(config, out_dir, data_root=data_root, download=download, device=device, progress=False)
    run._maybe_resume()
    return run


__all__ = ["DataLens", "DataLensCallback", "DataLensResult", "derive_seed", "load_trained"]
