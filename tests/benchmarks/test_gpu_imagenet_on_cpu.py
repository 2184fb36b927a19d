"""benchmarks/test_gpu_imagenet.py's benchmark bodies, run once each on the CPU at a small scale with a stand-in for
pytest-benchmark's fixture, and their results through gpu_report.py: so that a GPU slot is not lost to a bug in
them."""

import dataclasses
import time

import pytest

import gpu_report
import imagenet_workloads as W
import test_gpu_imagenet as bench


class OneCall:
    """pytest-benchmark's fixture, reduced to what the benchmarks use; times one call."""

    def __init__(self):
        self.group, self.extra_info = None, {}

    def pedantic(self, fn, rounds, warmup_rounds):
        assert rounds >= 5 and warmup_rounds >= 1
        start = time.perf_counter()
        fn()
        self.seconds = time.perf_counter() - start

    def as_json(self):
        return {"group": self.group, "extra_info": self.extra_info, "stats": {"median": self.seconds}}


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    monkeypatch.setenv("GRASPEXT_BENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    workload = dataclasses.replace(W.WORKLOADS["resnet50"], batch=4, image=32, classes=10, samples_per_class=1,
                                   scoring_chunks=1)
    monkeypatch.setitem(W.WORKLOADS, "resnet50", workload)
    bench._case.cache_clear()
    yield workload
    bench._case.cache_clear()


def test_layer_benchmarks_and_report(tiny):
    key = "256->256 k3 s1 2x2"  # layer3's 3x3 convolution at 32x32 input: a target layer
    results = []
    for impl in bench.LAYER_IMPLS:
        b = OneCall()
        bench.test_layer(b, "resnet50", key, 0.98, impl)
        assert b.extra_info["impl"] == impl and b.extra_info["largest_stage_3x3"]
        results.append(b.as_json())
    (row,) = gpu_report.layer_rows(results)
    assert row["best_dense"] in gpu_report.DENSE_LAYER_IMPLS and row["target"] == 2.0
    assert set(row["times_ms"]) == set(bench.LAYER_IMPLS)


def test_step_benchmarks_and_report(tiny):
    results = []
    for config, sparsity, amp, channels_last in [bench.STEPS[0], bench.STEPS[1], bench.STEPS[-1]]:
        b = OneCall()
        bench.test_step(b, "resnet50", config, sparsity, amp, channels_last, graphs=False)
        results.append(b.as_json())
    assert results[-1]["extra_info"]["modes"]  # the measured choice of each layer is reported
    rows = gpu_report.step_rows(results)
    assert {r["config"] for r in rows} == {"dense_tf32", "dense_bf16_cl", "sparse_bf16_0.98"}
    assert "vs fastest dense" in gpu_report.markdown([], rows)
