"""benchmarks/gpu_report.py: the best mode per layer, the ratios to the best dense configuration, the targets."""

import pytest

import gpu_report


def _bench(median_s, **info):
    return {"stats": {"median": median_s}, "extra_info": info}


def test_layer_rows_choose_fastest_and_flag_target():
    layer = {"model": "resnet50", "layer": "512->512 k3 s1 7x7", "sparsity": 0.98, "density": 0.02,
             "largest_stage_3x3": True, "dense_macs": 10**9, "sparse_macs": 4 * 10**8}
    benches = [_bench(t, impl=i, **layer) for i, t in [("dense_tf32", 0.004), ("dense_bf16_cl", 0.002),
                                                       ("sparse", 0.0015), ("compact_bf16", 0.0008)]]
    benches.append(_bench(0.01, impl="sparse", **{**layer, "sparsity": 0.9}))  # no dense for it: no row
    (row,) = gpu_report.layer_rows(benches)
    assert row["best_dense"] == "dense_bf16_cl" and row["best_mode"] == "compact_bf16"
    assert row["ratio"] == 2.5 and row["target"] == 2.0
    # 2 GFLOP in 2 ms, 0.8 GFLOP in 0.8 ms
    assert row["dense_tflops"] == pytest.approx(1.0) and row["sparse_tflops"] == pytest.approx(1.0)
    table = gpu_report.markdown([row], [])
    assert "compact_bf16 | 2.50x | 1.0 / 1.0 | met (>= 2x)" in table


def test_step_rows_against_fastest_dense():
    benches = [_bench(0.2, model="resnet50", config="dense_tf32", sparsity=None, graphs=False),
               _bench(0.1, model="resnet50", config="dense_bf16_cl", sparsity=None, graphs=True),
               _bench(0.125, model="resnet50", config="sparse_0.98", sparsity=0.98, graphs=True,
                      modes={"compact": 3, "sparse": 50})]
    rows = gpu_report.step_rows(benches)
    sparse = next(r for r in rows if r["sparsity"] == 0.98)
    assert sparse["ratio"] == 0.8 and sparse["best_dense"] == "dense_bf16_cl graph" and sparse["target"] == 1.3
    assert "MISSED (>= 1.3x)" in gpu_report.markdown([], rows)
