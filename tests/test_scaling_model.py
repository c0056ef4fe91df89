"""The paper scaling model (benchmarks/scaling_model.py): hand-counted small cases, the shape of
its curves, and that docs/scaling.md shows exactly the tables the script prints."""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from gist_ray.loss.plan import build_segments

ROOT = Path(__file__).resolve().parent.parent


def _load():
    # benchmarks/ is not a package: load the script from its path.
    spec = importlib.util.spec_from_file_location(
        "scaling_model", ROOT / "benchmarks" / "scaling_model.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


sm = _load()
SMALL = sm.Step(workers=2, rows=4, d=8, d_g=16, negatives=1)


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("aa, pp", [(True, True), (False, True), (False, False)])
def test_pairs_match_the_segment_plan(k, aa, pp):
    s = replace(SMALL, negatives=k, contrast_anchors=aa, contrast_positives=pp)
    segments, _ = build_segments(k, aa, pp)  # every segment spans the whole gathered pool
    assert s.segments == len(segments)
    assert sm.pairs(s) == s.rows * s.pool_rows * len(segments)


def test_loss_flops_by_hand():
    # W=2, b=4: 4 segments (AP, AA, PP, AN1) of 8 columns, 4 rows each -> 128 pairs.
    f = sm.loss_flops(SMALL)
    assert sm.pairs(SMALL) == 128
    assert f["forward"] == 2 * 128 * (8 + 16) == 6144  # student + guide tiles
    assert f["recompute"] == 6144
    assert f["grad_gemms"] == 4 * 128 * 8 == 4096  # dL and dC
    assert f["minimal"] == 10240
    assert f["executed"] == 16384


def test_kernel_seconds_bf16_and_fp32_paths():
    hw = replace(sm.H100, kernel_eff=1.0)
    f = sm.loss_flops(SMALL)
    assert sm.kernel_seconds(SMALL, hw) == pytest.approx(16384 / hw.mm16)
    fp32 = (6144 + 6144) / hw.tile32 + 4096 / hw.mm32
    assert sm.kernel_seconds(SMALL, hw, sm.BEFORE) == pytest.approx(fp32)
    fwd, bwd = sm.kernel_split(SMALL, hw, sm.DESIGN)
    assert fwd == pytest.approx(f["forward"] / hw.mm16)
    assert bwd == pytest.approx((f["recompute"] + f["grad_gemms"]) / hw.mm16)


def test_pool_bytes_by_hand():
    # 3 sets (A, P, N1) of 8 gathered rows: student 3*8*8*2 = 384 B, guide 3*8*16*2 = 768 B;
    # a 2-GPU ring moves half of each.
    t = sm.pool_traffic(SMALL, sm.DESIGN)
    assert t["forward"] == sm.Traffic(576, 6)  # 6 all-gathers of one ring step
    assert t["backward"] == sm.Traffic(192, 3)  # 3 reduce-scatters
    local = sm.pool_traffic(SMALL, sm.GUIDE_LOCAL)
    assert local["forward"] == sm.Traffic(192, 3)
    before = sm.pool_traffic(SMALL, sm.BEFORE)  # fp32, all-reduce: 2 x (1/2) x 768
    assert before["forward"] == sm.Traffic(1152, 6)
    assert before["backward"] == sm.Traffic(768, 6)
    assert sm.pool_traffic(SMALL, sm.SHIPPED) == t, "the shipped path is the design's all-gather"


def test_single_worker_moves_nothing():
    s = replace(SMALL, workers=1)
    assert all(t == sm.Traffic(0, 0) for t in sm.pool_traffic(s, sm.DESIGN).values())
    assert sm.pool_comm_seconds(s, sm.H100, 50e9) == 0


def test_transfer_time_and_links():
    assert sm.transfer_seconds(sm.Traffic(2e9, 10), 1e9, 1e-3) == pytest.approx(2.01)
    assert sm.ring_link(sm.H100, 8, 50e9) == (450e9, 2e-6)  # one node: NVLink
    assert sm.ring_link(sm.H100, 16, 50e9) == (50e9, 5e-6)  # 400 Gb/s per node
    assert sm.ring_link(sm.H100, 16, 400e9) == (400e9, 5e-6)  # 3.2 Tb/s per node
    p = sm.param_traffic(sm.ENCODERS[768], 4)
    assert p.bytes == pytest.approx(2 * 0.75 * 4 * 109.5e6) and p.steps == 6


def test_gathered_pool_memory_by_hand():
    # Pool: W·b·(2+k) rows of (d + d_g) 16-bit values, plus the student part's gradient.
    pool = 8 * 3 * ((8 + 16) * 2 + 8 * 2)
    assert pool == 1536
    # Kernel: left operands 2b(d+d_g)·2, fp32 dL 2b·d·4, softmax buffer b x min(chunk, W·b).
    kernel = 2 * 4 * 24 * 2 + 2 * 4 * 8 * 4 + 4 * 8 * 2
    assert sm.kernel_buffer_bytes(4, 8, 8, 16, 2) == kernel == 704
    assert sm.allgather_memory(SMALL) == pool + kernel


def test_softmax_buffer_is_capped():
    # At most 2**27 entries, whatever b and the pool are (gist_function.P_ELEMS).
    big = sm.kernel_buffer_bytes(16384, 1 << 23, 768, 1024, 2)
    left = 2 * 16384 * (768 + 1024) * 2 + 2 * 16384 * 768 * 4
    assert big - left == (1 << 27) * 2


def test_memory_before_issues_11_12_exceeded_the_design():
    s = sm.Step(32, 4096, 768)
    assert sm.allgather_memory(s, sm.BEFORE) > 2 * sm.allgather_memory(s)
    assert sm.allgather_memory(s, sm.SHIPPED) == sm.allgather_memory(s)


@pytest.mark.parametrize("field", ["workers", "rows", "d"])
def test_costs_grow_with_size(field):
    s = sm.Step(16, 1024, 768)
    bigger = replace(s, **{field: getattr(s, field) * 2})
    assert sm.kernel_seconds(bigger, sm.H100) > sm.kernel_seconds(s, sm.H100)
    assert sm.allgather_memory(bigger) > sm.allgather_memory(s)
    for bw in sm.NODE_LINKS.values():
        assert sm.pool_comm_seconds(bigger, sm.H100, bw) > sm.pool_comm_seconds(s, sm.H100, bw)


def test_kernel_grows_as_w_b_squared_and_bytes_as_w_b():
    s = sm.Step(16, 1024, 768)
    k = sm.kernel_seconds
    assert k(replace(s, rows=2048), sm.H100) == pytest.approx(4 * k(s, sm.H100))
    assert k(replace(s, workers=32), sm.H100) == pytest.approx(2 * k(s, sm.H100))
    t = sm.pool_traffic(s, sm.DESIGN)["forward"].bytes
    assert sm.pool_traffic(replace(s, rows=2048), sm.DESIGN)["forward"].bytes == 2 * t


def test_crossover_matches_closed_form():
    # Without latency, comm = kernel at b* = (2+k)/(2S) · eff·peak/BW · (W−1)/W for 16-bit
    # embeddings: independent of d.
    hw = replace(sm.H100, inter_alpha=0.0)
    bw, w = 50e9, 512
    closed = 3 / 8 * hw.kernel_eff * hw.mm16 / bw * (w - 1) / w
    for d in (768, 4096):
        assert sm.comm_crossover(sm.Step(w, 1, d), hw, bw) == pytest.approx(closed, abs=1)


def test_crossover_falls_with_bandwidth():
    slow = sm.comm_crossover(sm.Step(64, 1, 768), sm.H100, 50e9)
    fast = sm.comm_crossover(sm.Step(64, 1, 768), sm.H100, 400e9)
    assert fast < slow


def test_ring_and_sharded_pools():
    s = sm.Step(512, 16384, 768)
    # Ring memory does not depend on W; the gathered pool grows with it.
    assert sm.ring_memory(s) == sm.ring_memory(replace(s, workers=8))
    assert sm.ring_memory(s) < sm.sharded_memory(s, sm.H100) < sm.allgather_memory(s)
    # Compute-bound: the ring hides its traffic, the all-gather does not.
    bw = sm.NODE_LINKS["3.2 Tb/s"]
    assert sm.ring_seconds(s, sm.H100, bw) == pytest.approx(sm.kernel_seconds(s, sm.H100))
    assert sm.allgather_seconds(s, sm.H100, bw) > sm.ring_seconds(s, sm.H100, bw)
    # Communication-bound (small b, slow link): the ring's extra traffic loses.
    small, slow = sm.Step(512, 1024, 768), sm.NODE_LINKS["400 Gb/s"]
    assert sm.ring_seconds(small, sm.H100, slow) > sm.allgather_seconds(small, sm.H100, slow)
    assert sm.sharded_layout(s, sm.H100) == (8, 64)


def test_max_rows_is_the_largest_that_fits():
    base, budget = sm.Step(128, 1, 1024), 64e9
    b = sm.max_rows(sm.allgather_memory, base, budget)
    assert b % 256 == 0
    assert sm.allgather_memory(replace(base, rows=b)) <= budget
    assert sm.allgather_memory(replace(base, rows=b + 256)) > budget


def test_shipped_configs_are_read():
    s, enc, seq = sm.config_step(sm.load_config("gpu-multinode.yaml"))
    assert (s.workers, s.rows, s.d, s.d_g, s.negatives, seq) == (16, 1024, 384, 768, 0, 128)
    s, _, seq = sm.config_step(sm.load_config("cpu-default.yaml"))
    assert (s.workers, s.rows, s.negatives, seq) == (2, 16, 1, 64)


def test_flop_count_gives_a_steady_cpu_rate():
    # benchmarks/loss_bench_cpu.json: FLOPs (executed count) per CPU second of the chunked
    # backend stay within a noisy machine's spread from b = N = 1024 to 8192, where the time
    # grows 60-fold: the pair count is right.
    table = sm.table_cpu_loss()
    rates = [
        float(r.split("|")[-2])
        for r in table.splitlines()
        if r.startswith("| chunked") and int(r.split("|")[2].replace(",", "")) >= 1024
    ]
    assert len(rates) >= 4 and max(rates) / min(rates) < 1.4


def _blocks(text: str) -> dict[str, str]:
    found = re.findall(r"<!-- table: (\S+) -->\n(.*?)\n<!-- /table -->", text, re.S)
    return dict(found)


def test_doc_tables_equal_the_model(capsys):
    doc = _blocks((ROOT / "docs" / "scaling.md").read_text())
    expected = {**sm.tables(), **sm.cpu_tables()}
    assert sorted(doc) == sorted(expected)
    for name, body in expected.items():
        assert doc[name] == body, f"docs/scaling.md table {name!r} is stale: regenerate it"
    sm.main([])
    sm.main(["--check-cpu"])
    printed = _blocks(capsys.readouterr().out)
    assert printed == expected
