"""A paper model of one gist-ray training step at 8 to 512 GPUs (the tables of docs/scaling.md).

Pure Python (no torch): FLOPs of the fused GIST loss kernel and of the encoder, bytes and time of
the embedding all-gather, per-GPU memory of the gathered pool, and two alternatives: a ring that
passes candidate blocks from GPU to GPU (Inf-CL style) and a node-aligned sharded pool.

    python benchmarks/scaling_model.py              # every table of docs/scaling.md
    python benchmarks/scaling_model.py --check-cpu  # the model against benchmarks/*_cpu.json

Everything here is arithmetic on stated assumptions, not a measurement; no GPU has run it.
Units: bytes, FLOP, seconds; GB means 10**9 bytes.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Step:
    """The shape of one step on one GPU (the loss front end's view, gist_ray/loss/plan.py)."""

    workers: int  # W
    rows: int  # b, local query rows
    d: int  # student embedding width
    d_g: int = 1024  # guide embedding width
    negatives: int = 1  # k negative columns
    contrast_anchors: bool = True  # the AA segment
    contrast_positives: bool = True  # the PP segment

    @property
    def pool_rows(self) -> int:
        """Candidate columns per segment: the global batch W·b."""
        return self.workers * self.rows

    @property
    def segments(self) -> int:
        """AP, AA, PP, AN_1..k (build_segments); each has W·b columns."""
        return 1 + self.contrast_anchors + self.contrast_positives + self.negatives

    @property
    def sets(self) -> int:
        """Distinct gathered candidate sets: A, P and every N_k (PP reuses P, AA reuses A)."""
        return 2 + self.negatives


@dataclass(frozen=True)
class Impl:
    """What the code does with the pool: the design's intent, what main ships, or what it
    shipped before issues 11 and 12."""

    name: str
    emb_bytes: int  # student and guide embeddings as they reach the gather and the kernel
    grad_collective: str  # "reduce_scatter" (design) or "all_reduce" (gloo has no reduce-scatter)
    gather_guide: bool  # False: every worker reads the global batch's guide rows from the cache
    concat_copies: bool  # the front end concatenates the segments' candidates (and their grads)


DESIGN = Impl("design (bf16, reduce-scatter)", 2, "reduce_scatter", True, False)
GUIDE_LOCAL = Impl("design, guide twins read from the cache", 2, "reduce_scatter", False, False)
# Before issues 11 and 12: gradient caching and the guide cache handed over fp32 embeddings
# (`.float()`), so the kernel ran fp32 tiles (tf32x3) and fp32 cuBLAS GEMMs; the backward of the
# all-gather was an all-reduce; the front end concatenated the segments (P twice: AP and PP).
BEFORE = Impl("before issues 11-12 (fp32, all-reduce)", 4, "all_reduce", True, True)
# As shipped: embeddings keep the autocast dtype (bf16) into the loss, the guide cache's fp16
# rows are cast to it, the gather's backward is a reduce-scatter (an all-to-all on gloo: the same
# bytes), a segment table replaces the copies. Guide twins are still gathered with the cache on
# (GistLoss takes local guide rows only): the design's all-gather, exactly.
SHIPPED = Impl("as shipped (bf16, reduce-scatter)", 2, "reduce_scatter", True, False)
# On CPU there is no autocast: the same path in fp32.
CPU_PATH = Impl("as shipped on CPU (fp32, all-to-all)", 4, "reduce_scatter", True, False)


@dataclass(frozen=True)
class Hardware:
    name: str
    mm16: float  # dense 16-bit tensor-core peak, FLOP/s: encoder under autocast, bf16 kernel
    tile32: float  # the kernel's fp32 tiles: tf32x3 = three tf32 passes, so tf32 peak / 3
    mm32: float  # cuBLAS fp32 GEMMs (dL, dC): torch leaves TF32 off for matmul by default
    hbm: float  # bytes per GPU
    gpus_per_node: int
    intra_bw: float  # bytes/s per GPU per direction inside a node (NVLink, PCIe)
    intra_alpha: float  # seconds per ring step inside a node
    inter_alpha: float  # seconds per ring step across nodes
    kernel_eff: float = 0.5  # achieved fraction of peak in the loss kernel
    encoder_eff: float = 0.4  # achieved fraction of peak in encoder training (MFU)


# H100 and H200 SXM share the compute die; they differ in memory (80 vs 141 GB).
H100 = Hardware("H100 SXM", 989e12, 494.7e12 / 3, 67e12, 80e9, 8, 450e9, 2e-6, 5e-6)
H200 = replace(H100, name="H200 SXM", hbm=141e9)
# AWS g5.12xlarge, which the shipped GPU configs name: 4 A10G on PCIe (no NVLink), 40 Gb/s.
# Rougher than the H100 numbers: A10G's tensor peak (~70 bf16, ~35 tf32 TFLOP/s dense) is from
# public comparisons with the A10, and 12 GB/s is our guess for an NCCL ring over PCIe.
A10G = Hardware("A10G (g5.12xlarge)", 70e12, 35e12 / 3, 31.2e12, 24e9, 4, 12e9, 5e-6, 10e-6)
G5_NODE_BW = 40e9 / 8

# Inter-node bandwidth per node (bytes/s): one 400 Gb/s NIC, or 8 x 400 Gb/s (one per GPU).
NODE_LINKS = {"400 Gb/s": 400e9 / 8, "3.2 Tb/s": 3.2e12 / 8}


@dataclass(frozen=True)
class Encoder:
    name: str
    d: int
    params: float  # all parameters that get a gradient (what the gradient all-reduce moves)
    matmul_params: float  # parameters in matmuls (what 6·P·T counts; not embedding tables)


# MiniLM counted from the model (its unused pooler gets no gradient); the others are round
# figures for their class.
ENCODERS = {
    384: Encoder("all-MiniLM-L6-v2", 384, 22_565_376, 10_646_784),
    768: Encoder("BERT-base class (all-mpnet-base-v2)", 768, 109.5e6, 85.0e6),
    1024: Encoder("BERT-large class (bge-large)", 1024, 335e6, 302e6),
    4096: Encoder("7B decoder (e5-mistral-7b)", 4096, 7.11e9, 6.98e9),
}
SEQ_LEN = 128  # tokens per text in the paper tables, every text padded to it

# --------------------------------------------------------------------------------- the kernel


def pairs(s: Step) -> int:
    """(query row, candidate) pairs per GPU: b rows x S segments x W·b columns."""
    return s.rows * s.segments * s.pool_rows


def loss_flops(s: Step) -> dict[str, float]:
    """Loss FLOPs per GPU per step. ``minimal``: each GEMM once (forward tiles, dL, dC);
    ``executed``: the kernel's backward recomputes the student and guide tiles from the lse."""
    p = pairs(s)
    forward = 2.0 * p * (s.d + s.d_g)  # student tile L·Cᵀ and guide tile GL·GCᵀ
    grad_gemms = 4.0 * p * s.d  # dL = P·C and dC = Pᵀ·L
    return {
        "forward": forward,
        "recompute": forward,
        "grad_gemms": grad_gemms,
        "minimal": forward + grad_gemms,
        "executed": 2 * forward + grad_gemms,
    }


def kernel_split(s: Step, hw: Hardware, impl: Impl) -> tuple[float, float]:
    """Seconds of the loss kernel (forward, backward) at ``hw.kernel_eff`` of peak."""
    f, eff = loss_flops(s), hw.kernel_eff
    if impl.emb_bytes == 2:
        rate = eff * hw.mm16
        return f["forward"] / rate, (f["recompute"] + f["grad_gemms"]) / rate
    tiles = eff * hw.tile32
    return f["forward"] / tiles, f["recompute"] / tiles + f["grad_gemms"] / (eff * hw.mm32)


def kernel_seconds(s: Step, hw: Hardware, impl: Impl = DESIGN) -> float:
    return sum(kernel_split(s, hw, impl))


def encoder_flops(enc: Encoder, tokens: float, grad_cache: bool = True) -> float:
    """≈ 6·P·T to train (forward 2, backward 4); gradient caching adds a no-grad forward, 8·P·T.
    Attention's T² term is left out (about 5% at 128 tokens for a BERT-base)."""
    return (8.0 if grad_cache else 6.0) * enc.matmul_params * tokens


def guide_flops(guide: Encoder, tokens: float, cached: bool) -> float:
    """The frozen guide's forward, 2·P·T; nothing at all with the guide cache."""
    return 0.0 if cached else 2.0 * guide.matmul_params * tokens


def tokens(s: Step, seq_len: float = SEQ_LEN) -> float:
    return s.rows * s.sets * seq_len


def encoder_seconds(
    s: Step, hw: Hardware, enc: Encoder, seq_len: float = SEQ_LEN, grad_cache: bool = True
) -> float:
    return encoder_flops(enc, tokens(s, seq_len), grad_cache) / (hw.encoder_eff * hw.mm16)


# -------------------------------------------------------------------------- communication


@dataclass(frozen=True)
class Traffic:
    bytes: float  # what each GPU sends (and receives) over the ring
    steps: int  # ring steps, each paying one latency


def _ring_share(w: int) -> float:
    """A ring all-gather or reduce-scatter moves (W−1)/W of the full tensor through each GPU."""
    return (w - 1) / w


def pool_traffic(s: Step, impl: Impl) -> dict[str, Traffic]:
    """The pool's collectives in one step, per GPU: one all-gather per candidate set (and per
    guide twin) forward, one gradient collective per set backward (guide twins: none)."""
    w, e = s.workers, impl.emb_bytes
    student = s.sets * s.pool_rows * s.d * e
    guide = s.sets * s.pool_rows * s.d_g * e if impl.gather_guide else 0.0
    calls = s.sets * (2 if impl.gather_guide else 1)
    forward = Traffic(_ring_share(w) * (student + guide), (w - 1) * calls)
    if impl.grad_collective == "reduce_scatter":
        backward = Traffic(_ring_share(w) * student, (w - 1) * s.sets)
    else:  # a ring all-reduce is a reduce-scatter plus an all-gather: twice the bytes
        backward = Traffic(2 * _ring_share(w) * student, 2 * (w - 1) * s.sets)
    return {"forward": forward, "backward": backward}


def param_traffic(enc: Encoder, w: int) -> Traffic:
    """The explicit all-reduce of the student's fp32 parameter gradients (train.py)."""
    return Traffic(2 * _ring_share(w) * 4 * enc.params, 2 * (w - 1))


def ring_link(hw: Hardware, w: int, node_bw: float) -> tuple[float, float]:
    """(bytes/s, seconds per step) of a ring over W GPUs. Inside a node: the intra-node link.
    Across nodes NCCL stripes the ring over every NIC of the node, and all the data entering a
    node crosses those NICs once, so the node's total inter-node bandwidth is the ring's."""
    if w <= hw.gpus_per_node:
        return hw.intra_bw, hw.intra_alpha
    return min(hw.intra_bw, node_bw), hw.inter_alpha


def transfer_seconds(t: Traffic, bw: float, alpha: float) -> float:
    return t.bytes / bw + t.steps * alpha


def pool_comm_seconds(s: Step, hw: Hardware, node_bw: float, impl: Impl = DESIGN) -> float:
    bw, alpha = ring_link(hw, s.workers, node_bw)
    return sum(transfer_seconds(t, bw, alpha) for t in pool_traffic(s, impl).values())


# ---------------------------------------------------------------------------------- memory


def kernel_buffer_bytes(query_rows: int, pool_rows: int, d: int, d_g: int, e: int) -> float:
    """The kernel's own memory: both left operands, the fp32 dL accumulator and the backward's
    b x chunk softmax buffer (at most 2**27 entries, gist_function.P_ELEMS)."""
    chunk = max(256, min(1 << 16, (1 << 27) // max(query_rows, 1)) // 256 * 256)
    left = 2 * query_rows * (d + d_g) * e
    dleft = 2 * query_rows * d * 4
    prob = query_rows * min(chunk, pool_rows) * e
    return float(left + dleft + prob)


def allgather_memory(s: Step, impl: Impl = DESIGN) -> float:
    """Per-GPU bytes of the gathered pool, its gradient and the kernel's buffers (not the
    encoder). The guide rows are on the GPU whether gathered or read from the cache."""
    e = impl.emb_bytes
    row, grad = (s.d + s.d_g) * e, s.d * e
    if impl.concat_copies:  # peak of: gathered + concatenated, or concatenated + its grads
        forward = (s.sets + s.segments) * row
        backward = s.segments * (row + grad) + s.sets * grad
        pool = s.pool_rows * max(forward, backward)
    else:
        pool = s.pool_rows * s.sets * (row + grad)
    return pool + kernel_buffer_bytes(s.rows, s.pool_rows, s.d, s.d_g, e)


# ------------------------------------------------------------------ ring and sharded pools


def ring_seconds(s: Step, hw: Hardware, node_bw: float, impl: Impl = DESIGN) -> float:
    """Inf-CL-style ring: queries stay; each GPU's candidate block (and guide twins) travels
    W−1 hops forward, and again backward (the recompute needs it), carrying an fp32 gradient
    accumulator for its dC. Sending overlaps computing, so each pass costs the slower one."""
    kf, kb = kernel_split(s, hw, impl)
    bw, alpha = ring_link(hw, s.workers, node_bw)
    e, hops = impl.emb_bytes, s.workers - 1
    block = s.rows * s.sets * (s.d * e + (s.d_g * e if impl.gather_guide else 0))
    accum = s.rows * s.sets * s.d * 4
    cf = hops * (block / bw + alpha)
    cb = hops * ((block + accum) / bw + alpha)
    return max(kf, cf) + max(kb, cb)


def ring_memory(s: Step, impl: Impl = DESIGN) -> float:
    """Own block, one arriving and one leaving, and two fp32 accumulators in flight: O(b)."""
    e = impl.emb_bytes
    blocks = 3 * s.rows * s.sets * (s.d + s.d_g) * e + 2 * s.rows * s.sets * s.d * 4
    return blocks + kernel_buffer_bytes(s.rows, s.rows, s.d, s.d_g, e)


def sharded_layout(s: Step, hw: Hardware) -> tuple[int, int]:
    """(g, r): queries are shared by the g GPUs of a node, candidates by the r nodes."""
    g = min(s.workers, hw.gpus_per_node)
    return g, s.workers // g


def sharded_seconds(s: Step, hw: Hardware, node_bw: float, impl: Impl = DESIGN) -> float:
    """Node-aligned sharded pool: GPU j of node i holds the queries of its whole node (gathered
    over NVLink) and the candidates of GPU j of every node (gathered along that GPU's rail, at
    1/g of the node's bandwidth). Partial lse (max, sum) per query are combined inside the node,
    dL reduce-scattered inside the node, dC along the rail. Same FLOPs as the all-gather."""
    g, r = sharded_layout(s, hw)
    e, b = impl.emb_bytes, s.rows
    intra = Traffic(
        (g - 1) * b * (2 * (s.d + s.d_g) * e + 2 * s.d * e + 2 * 8), 3 * (g - 1)
    )  # queries and their guide twins, dL, the lse statistics
    cand = s.sets * b * (s.d * e + (s.d_g * e if impl.gather_guide else 0))
    inter = Traffic((r - 1) * (cand + s.sets * b * s.d * e), 2 * (r - 1) * s.sets)
    node_bw = min(hw.intra_bw, node_bw)
    return (
        kernel_seconds(s, hw, impl)
        + transfer_seconds(intra, hw.intra_bw, hw.intra_alpha)
        + transfer_seconds(inter, node_bw / g, hw.inter_alpha)
    )


def sharded_memory(s: Step, hw: Hardware, impl: Impl = DESIGN) -> float:
    """The node's g·b queries are the kernel's left operands (kernel_buffer_bytes counts them
    and their fp32 dL); the rail's r·b candidates per set and their gradient come on top."""
    g, r = sharded_layout(s, hw)
    e, b = impl.emb_bytes, s.rows
    cands = r * b * s.sets * ((s.d + s.d_g) * e + s.d * e)
    return cands + kernel_buffer_bytes(g * b, r * b, s.d, s.d_g, e)


def allgather_seconds(s: Step, hw: Hardware, node_bw: float, impl: Impl = DESIGN) -> float:
    """The loss as the code runs it: gather, then compute; nothing overlaps."""
    return kernel_seconds(s, hw, impl) + pool_comm_seconds(s, hw, node_bw, impl)


# ------------------------------------------------------------------------------ crossovers


def solve_rows(f: Callable[[int], float], lo: int = 1, hi: int = 1 << 26) -> int | None:
    """Smallest b in [lo, hi] with f(b) >= 0 for f increasing in b; None if there is none."""
    if f(hi) < 0:
        return None
    if f(lo) >= 0:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if f(mid) >= 0 else (mid, hi)
    return hi


def comm_crossover(base: Step, hw: Hardware, node_bw: float, impl: Impl = DESIGN) -> int | None:
    """Rows per GPU above which the loss kernel outlasts the pool's communication: kernel time
    grows as W·b², all-gather bytes as W·b, so below this b communication dominates."""

    def f(b: int) -> float:
        s = replace(base, rows=b)
        return kernel_seconds(s, hw, impl) - pool_comm_seconds(s, hw, node_bw, impl)

    return solve_rows(f)


def max_rows(memory: Callable[[Step], float], base: Step, budget: float) -> int:
    """Largest b (a multiple of 256) whose memory fits ``budget``; 0 if not even 256."""
    over = solve_rows(lambda n: 1 if memory(replace(base, rows=256 * n)) > budget else -1)
    if over is None:  # fits across the whole searched range
        over = (1 << 26) + 1
    return 256 * (over - 1)


# -------------------------------------------------------------------------------- tables

WORKERS = (8, 32, 128, 512)
ROWS = (1024, 4096, 16384)
DIMS = (768, 1024, 4096)
ENCODER_RESERVE = 16e9  # HBM kept for encoder weights, AdamW state and one mini-batch


def md_table(headers: list[str], rows: list[list[str]], left: int = 0) -> str:
    """A markdown table; the first ``left`` columns (words) left-aligned, numbers right."""
    align = "|" + "|".join("---" if i < left else "---:" for i in range(len(headers))) + "|"
    lines = ["| " + " | ".join(headers) + " |", align]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def ms(seconds: float) -> str:
    v = seconds * 1e3
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def gb(n: float) -> str:
    v = n / 1e9
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def krows(n: int | None) -> str:
    if n is None:
        return "never"
    if n == 0:
        return "< 256"
    return f"{n / 1024:.1f}k" if n < 10240 else f"{n / 1024:,.0f}k"


def ratio(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:,.0f}"


def fits(n: float) -> str:
    budget = [hw.hbm - ENCODER_RESERVE for hw in (H100, H200)]
    return "/".join("yes" if n <= cap else "no" for cap in budget)


def table_loss(d: int) -> str:
    """Kernel, all-gather + reduce-scatter and memory at one student width (design)."""
    rows = []
    for w in WORKERS:
        for b in ROWS:
            s = Step(w, b, d)
            f, k = loss_flops(s), kernel_seconds(s, H100)
            traffic = sum(t.bytes for t in pool_traffic(s, DESIGN).values())
            comm = [pool_comm_seconds(s, H100, bw) for bw in NODE_LINKS.values()]
            tag = " (NVLink)" if w <= H100.gpus_per_node else ""
            mem = allgather_memory(s)
            rows.append([
                str(w), f"{b // 1024}k", f"{s.pool_rows // 1024:,}k",
                f"{f['executed'] / 1e12:,.1f} / {f['minimal'] / 1e12:,.1f}", ms(k), gb(traffic),
                *(ms(c) + tag for c in comm), *(ratio(c / k) for c in comm), gb(mem), fits(mem),
            ])  # fmt: skip
    return md_table(
        [
            "W", "b", "W·b", "kernel TFLOP executed / minimal", "kernel ms", "GB moved per GPU",
            "comm ms, 400 Gb/s nodes", "comm ms, 3.2 Tb/s nodes", "comm ÷ kernel, 400 Gb/s",
            "comm ÷ kernel, 3.2 Tb/s", "pool + kernel GB", "fits 80 / 141 GB (16 GB kept)",
        ],
        rows,
    )  # fmt: skip


def table_crossover() -> str:
    """b per GPU below which the pool's communication outlasts the loss kernel."""
    rows = []
    cases = [("NVLink (one node)", 8, 0.0)]
    cases += [(f"{name} per node", w, bw) for name, bw in NODE_LINKS.items() for w in (32, 512)]
    for link, w, bw in cases:
        for d in DIMS:
            base = Step(w, 1, d)
            cells = [krows(comm_crossover(base, H100, bw, impl)) for impl in (
                SHIPPED, GUIDE_LOCAL, BEFORE)]  # fmt: skip
            rows.append([link, str(w), str(d), *cells])
    return md_table(
        ["link", "W", "d", "design = as shipped", "guide twins from the cache",
         "before issues 11-12 (fp32)"], rows, 1,
    )  # fmt: skip


def table_fit() -> str:
    """Largest b per GPU whose pool fits next to a 16 GB encoder reserve, per scheme."""
    rows = []
    for w in WORKERS:
        for d in DIMS:
            base = Step(w, 1, d)
            cells = []
            for mem in (
                lambda s: allgather_memory(s, SHIPPED),
                lambda s: allgather_memory(s, BEFORE),
                lambda s: sharded_memory(s, H100),
                ring_memory,
            ):
                caps = [max_rows(mem, base, hw.hbm - ENCODER_RESERVE) for hw in (H100, H200)]
                cells.append(" / ".join(krows(c) for c in caps))
            rows.append([str(w), str(d), *cells])
    return md_table(
        [
            "W",
            "d",
            "all-gather (design = as shipped)",
            "all-gather (before issues 11-12)",
            "sharded pool",
            "ring",
        ],
        rows,  # fmt: skip
    )


def table_schemes() -> str:
    """All-gather against ring and sharded pool: loss time (kernel + exposed comm), memory."""
    rows = []
    for link, bw in NODE_LINKS.items():
        for w in (32, 512):
            for b in (1024, 16384):
                for d in (768, 4096):
                    s = Step(w, b, d)
                    t = {
                        "all-gather": allgather_seconds(s, H100, bw),
                        "ring": ring_seconds(s, H100, bw),
                        "sharded": sharded_seconds(s, H100, bw),
                    }
                    m = [allgather_memory(s), ring_memory(s), sharded_memory(s, H100)]
                    rows.append([
                        link, str(w), f"{b // 1024}k", str(d), ms(kernel_seconds(s, H100)),
                        *(ms(v) for v in t.values()), " / ".join(gb(x) for x in m),
                        min(t, key=t.get),
                    ])  # fmt: skip
    return md_table(
        [
            "node link", "W", "b", "d", "kernel ms", "all-gather ms", "ring ms", "sharded ms",
            "GB per GPU: all-gather / ring / sharded", "fastest",
        ],
        rows,
        1,
    )  # fmt: skip


def step_parts(
    s: Step,
    hw: Hardware,
    enc: Encoder,
    node_bw: float,
    impl: Impl = DESIGN,
    seq_len: float = SEQ_LEN,
    grad_cache: bool = True,
) -> dict[str, float]:
    """Seconds of one whole step, nothing overlapped (as train.py runs it)."""
    bw, alpha = ring_link(hw, s.workers, node_bw)
    return {
        "encoder": encoder_seconds(s, hw, enc, seq_len, grad_cache),
        "kernel": kernel_seconds(s, hw, impl),
        "pool comm": pool_comm_seconds(s, hw, node_bw, impl),
        "param all-reduce": transfer_seconds(param_traffic(enc, s.workers), bw, alpha)
        if s.workers > 1
        else 0.0,
    }


def bound(parts: dict[str, float]) -> str:
    comm = parts["pool comm"] + parts["param all-reduce"]
    groups = {"encoder": parts["encoder"], "loss kernel": parts["kernel"], "communication": comm}
    return max(groups, key=groups.get)


def table_step() -> str:
    """Whole step at 400 Gb/s per node: encoder (gradient caching, guide cache), loss, comm."""
    rows = []
    bw = NODE_LINKS["400 Gb/s"]
    for d in (768, 1024):
        for w in WORKERS:
            for b in ROWS:
                s = Step(w, b, d)
                p = step_parts(s, H100, ENCODERS[d], bw, DESIGN, SEQ_LEN)
                total = sum(p.values())
                share = (p["pool comm"] + p["param all-reduce"]) / total
                rows.append([
                    str(d), str(w), f"{b // 1024}k", *(ms(v) for v in p.values()), ms(total),
                    f"{share:.0%}", bound(p),
                ])  # fmt: skip
    return md_table(
        [
            "d", "W", "b", "encoder ms", "kernel ms", "pool comm ms", "param all-reduce ms",
            "step ms", "comm share", "bound by",
        ],
        rows,
    )  # fmt: skip


def step_crossover_workers(d: int, node_bw: float, b: int = 4096) -> int | None:
    """W at which the step's communication (pool and parameter gradients) outlasts the
    encoder, at b rows per GPU (almost independent of b: both grow linearly in it)."""

    def f(w: int) -> float:
        p = step_parts(Step(w, b, d), H100, ENCODERS[d], node_bw)
        return p["pool comm"] + p["param all-reduce"] - p["encoder"]

    return solve_rows(f, lo=2, hi=1 << 24)


def table_step_crossover() -> str:
    """Where the loss kernel, or communication, overtakes the encoder in a whole step."""
    rows = []
    for d in DIMS:
        one = Step(1, 4096, d)
        per_row_encoder = encoder_seconds(one, H100, ENCODERS[d]) / one.rows
        per_pair_kernel = kernel_seconds(one, H100) / one.rows**2  # kernel = c·W·b²
        rows.append([
            str(d), ENCODERS[d].name, f"{per_row_encoder / per_pair_kernel / 1e6:,.1f}M",
            *(f"{step_crossover_workers(d, bw):,}" for bw in NODE_LINKS.values()),
        ])  # fmt: skip
    return md_table(
        ["d", "student", "W·b where loss kernel = encoder",
         "W where comm = encoder, 400 Gb/s", "W where comm = encoder, 3.2 Tb/s"],
        rows,
        2,
    )  # fmt: skip


def table_shipped() -> str:
    """What the shipped code costs against the design, and what it cost before issues 11-12."""
    s, bw = Step(32, 4096, 768), NODE_LINKS["400 Gb/s"]
    rows = []
    for impl in (DESIGN, SHIPPED, GUIDE_LOCAL, BEFORE):
        traffic = sum(t.bytes for t in pool_traffic(s, impl).values())
        rows.append([
            impl.name, gb(traffic), ms(pool_comm_seconds(s, H100, bw, impl)),
            ms(kernel_seconds(s, H100, impl)), gb(allgather_memory(s, impl)),
        ])  # fmt: skip
    return md_table(
        ["W = 32, b = 4k, d = 768, 400 Gb/s", "GB moved per GPU", "comm ms", "kernel ms",
         "pool + kernel GB"],
        rows,
        1,
    )  # fmt: skip


# --------------------------------------------------------------------- the shipped configs

MODELS = {"all-MiniLM-L6-v2": ENCODERS[384], "all-mpnet-base-v2": ENCODERS[768]}
NEGATIVES = {"insuranceqa": 1, "sentence-transformers/gooaq": 0}  # negative_k columns


def load_config(name: str) -> dict:
    """A shipped config over the built-in defaults (cpu-default.yaml spells them out)."""
    import yaml

    def read(n: str) -> dict:
        return yaml.safe_load((ROOT / "configs" / n).read_text())

    cfg = read("cpu-default.yaml")
    for section, values in read(name).items():
        if isinstance(values, dict):
            cfg[section] = {**cfg.get(section, {}), **values}
        else:
            cfg[section] = values
    return cfg


def config_step(cfg: dict) -> tuple[Step, Encoder, int]:
    w = cfg["ray"]["num_workers"]
    student, guide = MODELS[cfg["model"]["student"]], MODELS[cfg["model"]["guide"]]
    k = NEGATIVES[cfg["data"]["train"]]
    s = Step(w, cfg["train"]["batch_size"] // w, student.d, guide.d, k)
    return s, student, cfg["model"]["max_seq_length"]


def cpu_hardware() -> Hardware:
    """This 2-core machine, one torch thread per worker: every matmul at the rate the chunked
    loss reached in benchmarks/loss_bench_cpu.json; gloo over loopback (GLOO_*)."""
    rate = chunked_rate()
    return Hardware(
        "2-core CPU (measured rates)", rate, rate, rate, 24e9, 2, GLOO_BW, GLOO_ALPHA, GLOO_ALPHA,
        kernel_eff=1.0, encoder_eff=1.0,
    )  # fmt: skip


def table_configs() -> str:
    """configs/*.yaml: every text padded to max_seq_length, guide cache on, the shipped path
    (bf16 on GPUs, fp32 on the CPU)."""
    cases = [
        ("cpu-default.yaml", cpu_hardware(), 0.0),
        ("gpu-1node.yaml", A10G, G5_NODE_BW),
        ("gpu-1node.yaml", H100, NODE_LINKS["400 Gb/s"]),
        ("gpu-multinode.yaml", A10G, G5_NODE_BW),
        ("gpu-multinode.yaml", H100, NODE_LINKS["400 Gb/s"]),
    ]
    rows = []
    for name, hw, node_bw in cases:
        cfg = load_config(name)
        s, enc, seq = config_step(cfg)
        impl = CPU_PATH if hw.kernel_eff == 1.0 else SHIPPED
        p = step_parts(s, hw, enc, node_bw, impl, seq, cfg["train"]["mini_batch_size"] > 0)
        link = "gloo, one machine" if hw.kernel_eff == 1.0 else (
            "PCIe + 40 Gb/s" if hw is A10G else "NVLink + 400 Gb/s")  # fmt: skip
        rows.append([
            name, f"{hw.name}, {link}", f"{s.workers} x {s.rows}",
            f"{s.d} / {s.d_g} / {s.negatives} / {seq}", *(ms(v) for v in p.values()),
            ratio(p["pool comm"] / p["kernel"]), bound(p),
        ])  # fmt: skip
    return md_table(
        [
            "config", "hardware", "W x b", "d / d_g / k / tokens", "encoder ms", "kernel ms",
            "pool comm ms", "param all-reduce ms", "pool comm ÷ kernel", "step bound by",
        ],
        rows,
        2,
    )  # fmt: skip


def tables() -> dict[str, str]:
    """Every paper table of docs/scaling.md, by name."""
    out = {f"loss-d{d}": table_loss(d) for d in DIMS}
    out["crossover"] = table_crossover()
    out["fit"] = table_fit()
    out["schemes"] = table_schemes()
    out["step"] = table_step()
    out["step-crossover"] = table_step_crossover()
    out["shipped"] = table_shipped()
    out["configs"] = table_configs()
    return out


# --------------------------------------------------------------------- the measured CPU runs

# gloo over loopback on the project's 2-core machine, measured once for this model (not in
# the JSON): 2 processes with one thread each, all_reduce of 22,565,376 fp32 (MiniLM's
# gradients) took 0.113-0.134 s, median 0.127 s over 5 (load average ~3.5); a 16 x 384
# all_gather took 0.88 ms (median of 20). Ring bytes per rank for W = 2: the tensor, 90 MB.
GLOO_BW = 90.26e6 / 0.127
GLOO_ALPHA = 0.88e-3
# Padded tokens per InsuranceQA row in batches of 16 at max length 128 (MiniLM's tokenizer,
# 512 rows, seed 42): anchor 15.7, positive 128, negative 128.
CPU_TOKENS_PER_ROW = 15.7 + 128 + 128


def _bench(name: str) -> dict:
    return json.loads((ROOT / "benchmarks" / name).read_text())


def chunked_rate(size: int = 8192) -> float:
    """FLOP/s of the chunked CPU backend at b = N = size (executed count over CPU seconds)."""
    bench = _bench("loss_bench_cpu.json")
    cfg = bench["config"]
    row = next(r for r in bench["results"] if r["backend"] == "chunked" and r["b"] == size)
    s = Step(1, size, cfg["d"], cfg["d_guide"], cfg["negatives"])
    return loss_flops(s)["executed"] / row["cpu_s"]


def table_cpu_loss() -> str:
    """The FLOP count against the CPU loss benchmark: a steady rate means the count scales."""
    bench = _bench("loss_bench_cpu.json")
    cfg = bench["config"]
    rows = []
    for r in bench["results"]:
        if r["backend"] not in ("chunked", "reference") or "cpu_s" not in r:
            continue
        s = Step(1, r["b"], cfg["d"], cfg["d_guide"], cfg["negatives"])
        count = "executed" if r["backend"] == "chunked" else "minimal"
        f = loss_flops(s)[count]
        rows.append([
            r["backend"], f"{r['b']:,}", f"{r['candidates']:,}", count, f"{f / 1e9:,.1f}",
            f"{r['cpu_s']:.2f}", f"{f / r['cpu_s'] / 1e9:.1f}",
        ])  # fmt: skip
    return md_table(
        ["backend", "b = N", "candidates / row", "FLOP count", "GFLOP", "CPU s", "GFLOP/s"],
        rows,
        1,
    )


def cpu_model(workers: int, per_worker: int) -> dict[str, float]:
    """The 1 vs 2 worker runs: MiniLM training without gradient caching, fp32, guide cache."""
    hw, enc = cpu_hardware(), ENCODERS[384]
    s = Step(workers, per_worker, 384, 768, 1)
    parts = {
        "encoder": encoder_flops(enc, per_worker * CPU_TOKENS_PER_ROW, False) / hw.mm16,
        "loss": kernel_seconds(s, hw, CPU_PATH),
        "gloo": 0.0,
    }
    if workers > 1:
        loss_allreduce = Traffic(0.0, 2 * (workers - 1))
        traffic = [*pool_traffic(s, CPU_PATH).values(), param_traffic(enc, workers), loss_allreduce]
        parts["gloo"] = sum(transfer_seconds(t, GLOO_BW, GLOO_ALPHA) for t in traffic)
    return parts


def cpu_check() -> tuple[str, list[str]]:
    """Model vs measured step times of benchmarks/scaling_cpu.json, and what that says."""
    runs = {r["workers"]: r for r in _bench("scaling_cpu.json")["workers"]}
    rows, predicted = [], {}
    for w, run in sorted(runs.items()):
        p = cpu_model(w, run["per_worker_batch"])
        predicted[w] = sum(p.values())
        rows.append([
            str(w), str(run["per_worker_batch"]), f"{p['encoder']:.2f}", f"{p['loss'] * 1e3:.2f}",
            f"{p['gloo'] * 1e3:.0f}", f"{predicted[w]:.2f}", f"{run['step_s']:.2f}",
            f"{predicted[w] / run['step_s'] - 1:+.0%}",
        ])  # fmt: skip
    table = md_table(
        ["workers", "rows / worker", "encoder s", "loss ms", "gloo ms", "model step s",
         "measured step s", "model vs measured"],
        rows,
    )  # fmt: skip
    grow_model = predicted[2] / predicted[1]
    grow_meas = runs[2]["step_s"] / runs[1]["step_s"]
    implied = encoder_flops(ENCODERS[384], runs[1]["per_worker_batch"] * CPU_TOKENS_PER_ROW, False)
    notes = [
        f"chunked loss rate at b = N = 8192: {chunked_rate() / 1e9:.1f} GFLOP/s (executed count)",
        f"rate the 1-worker step implies if it were all encoder matmuls: "
        f"{implied / runs[1]['step_s'] / 1e9:.1f} GFLOP/s",
        f"1 -> 2 workers, step time: model x{grow_model:.3f}, measured x{grow_meas:.3f}",
        f"unexplained by the model in the 2-worker step: "
        f"{runs[2]['step_s'] - runs[1]['step_s'] - (predicted[2] - predicted[1]):.2f} s",
    ]
    return table, notes


def cpu_tables() -> dict[str, str]:
    return {"cpu-loss": table_cpu_loss(), "cpu-workers": cpu_check()[0]}


# ------------------------------------------------------------------------------------ main


def block(name: str, body: str) -> str:
    """A table between the markers docs/scaling.md uses (tests compare the two)."""
    return f"<!-- table: {name} -->\n{body}\n<!-- /table -->"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check-cpu", action="store_true", help="compare with the CPU benchmarks")
    args = ap.parse_args(argv)
    if args.check_cpu:
        for name, body in cpu_tables().items():
            print(block(name, body) + "\n")
        for line in cpu_check()[1]:
            print(f"- {line}")
        return
    print(
        f"Assumptions: {H100.name} bf16 {H100.mm16 / 1e12:.0f} TFLOP/s dense, kernel at "
        f"{H100.kernel_eff:.0%}, encoder at {H100.encoder_eff:.0%}; NVLink "
        f"{H100.intra_bw / 1e9:.0f} GB/s per GPU; d_g = 1024, k = 1, {SEQ_LEN} tokens per text.\n"
    )
    for name, body in tables().items():
        print(block(name, body) + "\n")


if __name__ == "__main__":
    main()
