"""RigL/SET inside the trainer: against the official rule in a masked dense loop, state handling, resume."""

import copy
import json
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import graspext as gx
from graspext.callbacks import Callback
from graspext.dst import SET, RigL, initial_masks
from graspext.dst.rule import stateless_generator
from graspext.masks import Masks
from graspext.testing.official_rigl import masked_dense_rigl
from tests.helpers import ordered_loader, tiny_data, tiny_net


@pytest.mark.parametrize("kernels", ["sparse", "dense"])
def test_rigl_run_ends_with_the_masks_of_the_official_rule(kernels):
    data, net = tiny_data(), tiny_net()
    masks = initial_masks(net, 0.8)
    assert "conv1.weight" not in masks  # the first layer stays dense, as in the official configs
    config = RigL(frequency=4, end_step=14, noise_std=1e-5, seed=3)
    model = copy.deepcopy(net)
    result = gx.train(model, ordered_loader(data), ordered_loader(data), masks=masks, dst=config, epochs=3, progress=False,
                      kernels=kernels, weight_decay=5e-4, lr=0.05)
    batches = [list(ordered_loader(data))] * 3
    lrs = [r["lr"] for r in result.history]

    def noise(name, step, mask):
        full = torch.zeros(mask.shape, dtype=torch.float64)
        full[mask] = torch.randn(int(mask.sum()), generator=stateless_generator(3, name, step, "drop"),
                                 dtype=torch.float64) * 1e-5
        return full

    ref_model, ref_masks, updates = masked_dense_rigl(net, dict(masks), batches, lrs, frequency=4, end_step=14,
                                                      weight_decay=5e-4, noise_fn=noise)
    assert updates == [0, 4, 8, 12]
    for name in masks:
        assert torch.equal(result.masks[name], ref_masks[name]), name
        assert not torch.equal(result.masks[name], masks[name])  # the masks did move
        assert int(result.masks[name].sum()) == int(masks[name].sum())
    ref_state = ref_model.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, ref_state[key], rtol=1e-9, atol=1e-11, msg=key)


class _Probe(Callback):
    """Snapshots the sparse layers before and after each update step (it runs before the dst callback)."""

    def __init__(self):
        self.events = []

    def _state(self, trainer):
        out = {}
        for name, layer in trainer.sparse_layers.items():
            buf = trainer.optimizer.state.get(layer.values, {}).get("momentum_buffer")
            dense_buf = layer.pattern.scatter(buf.detach()) if buf is not None else None
            out[name] = (layer.mask().clone(), layer.dense_weight().detach().clone(), dense_buf)
        return out

    def on_train_batch_start(self, trainer, inputs, targets):
        self._before = self._state(trainer) if trainer.global_step % 3 == 0 else None
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, loss):
        if self._before is not None:
            self.events.append((self._step, self._before, self._state(trainer)))


def test_grown_weights_and_momentum_start_at_zero_survivors_keep_theirs():
    data, net = tiny_data(torch.float32), tiny_net(torch.float32)
    masks = initial_masks(net, 0.7)
    probe = _Probe()
    gx.train(net, ordered_loader(data), ordered_loader(data), masks=masks, dst=RigL(frequency=3, end_step=15),
             callbacks=[probe], epochs=3, progress=False, kernels="sparse")
    checked_regrown = False
    for step, before, after in probe.events:
        for name in masks:
            old_mask, old_w, old_buf = before[name]
            new_mask, new_w, new_buf = after[name]
            assert int(new_mask.sum()) == int(old_mask.sum())
            grown, survived = new_mask & ~old_mask, new_mask & old_mask
            assert grown.any() == (step < 15)  # the cosine drop fraction reaches 0 at end_step
            assert torch.equal(new_w[grown], torch.zeros_like(new_w[grown]))
            assert torch.equal(new_w[~new_mask], torch.zeros_like(new_w[~new_mask]))
            # No optimizer step on RigL update steps: survivors are untouched, value and momentum.
            assert torch.equal(new_w[survived], old_w[survived])
            if old_buf is not None:
                assert torch.equal(new_buf[grown], torch.zeros_like(new_buf[grown]))
                assert torch.equal(new_buf[survived], old_buf[survived])
            checked_regrown |= bool(survived.any())
    assert len(probe.events) == 6 and checked_regrown  # updates at 0, 3, ..., 15


def test_a_weight_dropped_and_regrown_in_one_update_keeps_its_value_unless_reinit_when_same():
    from graspext.nn import SparseLinear

    layer = SparseLinear.from_dense(nn.Linear(4, 2), torch.tensor([[True, True, False, False], [True] * 2 + [False] * 2]))
    values = layer.values.detach().clone()
    mask = layer.mask()
    layer.set_mask_(mask, reinit=None)  # dropped and regrown at once: nothing changes
    assert torch.equal(layer.values, values)
    reinit = torch.zeros_like(mask)
    reinit[0, 0] = True
    assert layer.set_mask_(mask, reinit=reinit) == 1
    assert layer.values[0] == 0 and torch.equal(layer.values[1:], values[1:])


def test_set_grows_after_the_optimizer_step():
    data, net = tiny_data(torch.float32), tiny_net(torch.float32)
    masks = initial_masks(net, 0.7)
    result = gx.train(net, ordered_loader(data), ordered_loader(data), masks=masks, dst=SET(frequency=2, end_step=10), epochs=2,
                      progress=False)
    for name in masks:
        assert int(result.masks[name].sum()) == int(masks[name].sum())
        assert not torch.equal(result.masks[name], masks[name])


class _KilledLoader:
    """A loader that raises at one batch of one epoch, as a killed process stops."""

    def __init__(self, loader, epoch_batch=None):
        self.loader, self.batch_size, self.kill_at, self.epoch = loader, loader.batch_size, epoch_batch, -1
        self.generator = None

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.epoch += 1
        for i, batch in enumerate(self.loader):
            if self.kill_at == (self.epoch, i):
                raise KeyboardInterrupt("killed")
            yield batch


@pytest.mark.parametrize("kernels,method", [("sparse", RigL), ("dense", RigL), ("sparse", SET)])
def test_resume_after_kill_reproduces_the_run_bit_for_bit(tmp_path, kernels, method):
    data = tiny_data(torch.float32, n=40)
    options = {"epochs": 3, "progress": False, "kernels": kernels, "lr": 0.05}
    config = method(frequency=3, end_step=12)
    masks = initial_masks(tiny_net(torch.float32), 0.8)

    def loader(seed):
        return DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed))

    whole_model = tiny_net(torch.float32)
    whole = gx.train(whole_model, loader(0), loader(1), masks=masks, dst=config, out_dir=str(tmp_path / "a"),
                     **options)

    killed_model = tiny_net(torch.float32)
    with pytest.raises(KeyboardInterrupt):
        gx.train(killed_model, _KilledLoader(loader(0), (1, 2)), loader(1), masks=masks, dst=config,
                 out_dir=str(tmp_path / "b"), **options)
    resumed_model = tiny_net(torch.float32)
    resumed = gx.train(resumed_model, loader(0), loader(1), masks=masks, dst=config, out_dir=str(tmp_path / "b"),
                       **options)
    def timeless(history):
        return [{k: v for k, v in r.items() if k != "train_images_per_s"} for r in history]

    assert timeless(resumed.history) == timeless(whole.history)
    for name in masks:
        assert torch.equal(resumed.masks[name], whole.masks[name])
    for key, value in whole_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["mask_updates"] == 5 and 0 < summary["mean_changed_fraction"] < 0.3
    assert summary["dst"]["method"] == config.method
    final = Masks.load(os.path.join(tmp_path, "b", "final_masks.pt"))
    assert all(torch.equal(final[n], whole.masks[n]) for n in masks)

    with pytest.raises(ValueError, match="frequency=3.*frequency=4"):
        gx.train(tiny_net(torch.float32), loader(0), loader(1), masks=masks, dst=method(frequency=4, end_step=12),
                 out_dir=str(tmp_path / "b"), **options)


def test_bad_dst_input_is_refused_clearly():
    data, net = tiny_data(torch.float32), tiny_net(torch.float32)
    masks = initial_masks(net, 0.8)
    with pytest.raises(ValueError, match="dst needs masks"):
        gx.train(net, ordered_loader(data), ordered_loader(data), dst=RigL(), epochs=1, progress=False)
    with pytest.raises(TypeError, match="dst must be graspext.dst.RigL"):
        gx.train(net, ordered_loader(data), ordered_loader(data), masks=masks, dst="rigl", epochs=1, progress=False)
    with pytest.raises(ValueError, match="end_step 100 lies beyond the training, whose steps are 0..5"):
        gx.train(net, ordered_loader(data), ordered_loader(data), masks=masks, dst=RigL(end_step=100), epochs=1, progress=False)
    other = Masks({"fc.weight": torch.ones(3, 7, dtype=torch.bool)})
    with pytest.raises(ValueError, match="'fc.weight' has shape"):
        gx.train(net, ordered_loader(data), ordered_loader(data), masks=other, dst=RigL(), epochs=1, progress=False)
    with pytest.raises(ValueError, match="'head.weight' is not a parameter"):
        gx.train(net, ordered_loader(data), ordered_loader(data), masks=Masks({"head.weight": torch.ones(2, 2, dtype=torch.bool)}),
                 dst=RigL(), epochs=1, progress=False)
