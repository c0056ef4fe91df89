"""Large-student settings side by side: full fine-tuning vs LoRA, each with and without gradient
checkpointing, on a small random Llama-style decoder (last-token pooling), one optimizer step of
gist-ray's training step at a time.

Each setting runs in a fresh process: model loaded (and adapter added), then one warm-up step
and ``--steps`` timed steps. Peak training memory: the process's peak resident set over all the
steps (``VmHWM``, reset through ``/proc/self/clear_refs`` once the model is loaded) minus the
resident set at that point: gradients, AdamW state (created in the first step) and activations.
The peak is taken over the whole run because the C allocator keeps freed heap memory, so a
later step reuses the first one's pages without raising the resident set. Step time: the mean
wall time of the timed steps. Results as JSON lines on stdout (a Markdown table with ``--table``).

    python benchmarks/lora_bench.py --table
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = [("full", False), ("full", True), ("lora", False), ("lora", True)]


def _rss_mib(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split(field + ":")[1].split()[0]) / 1024


def build(root: Path, args: argparse.Namespace) -> Path:
    """A random decoder embedder saved as a sentence-transformers folder."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(args.vocab - 4)]
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[EOS]", "[BOS]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        intermediate_size=4 * args.hidden,
        max_position_embeddings=args.seq_len * 2,
        pad_token_id=0,
    )
    LlamaModel(cfg).save_pretrained(root / "hf")
    fast.save_pretrained(root / "hf")
    module = Transformer(str(root / "hf"), max_seq_length=args.seq_len)
    model = SentenceTransformer(
        modules=[module, Pooling(module.get_embedding_dimension(), "lasttoken")],
        prompts={"query": "w1 w2 w3 w4"},
    )
    model.save(str(root / "st"))
    return root / "st"


def run_one(args: argparse.Namespace) -> dict:
    import random

    import torch

    from gist_ray.config import load_config
    from gist_ray.loss import GistLoss
    from gist_ray.models.encoder import load_encoder
    from gist_ray.models.lora import prepare_student
    from gist_ray.models.spec import ModelSpec
    from gist_ray.train.checkpoint import TrainState
    from gist_ray.train.loop import optimizer_step
    from gist_ray.train.optim import build_optimizer, build_scheduler

    torch.set_num_threads(args.threads)
    over = [
        f"model.student={args.model}",
        f"model.max_seq_length={args.seq_len}",
        f"train.batch_size={args.batch}",
        f"train.gradient_checkpointing={str(args.checkpointing).lower()}",
        "ray.num_workers=1",
    ]
    if args.mode == "lora":
        over.append(f"model.lora.rank={args.rank}")
    cfg = load_config(overrides=over)
    student = load_encoder(ModelSpec.student(cfg))
    prepare_student(student.model, cfg)
    student.train()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the loaded model
    loaded = _rss_mib("VmRSS")
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    opt = build_optimizer(student, cfg.train)
    state = TrainState(opt, build_scheduler(opt, cfg.train, 100), None)
    rng = random.Random(0)
    words = [f"w{i}" for i in range(args.vocab - 4)]

    def column() -> list[str]:  # every text fills the max length: the worst case
        return [" ".join(rng.choices(words, k=args.seq_len)) for _ in range(args.batch)]

    loss_fn = GistLoss()
    guide = [torch.randn(args.batch, 64) for _ in range(3)]
    # warm-up: optimizer state, first-call imports
    optimizer_step(cfg, student, loss_fn, state, [column() for _ in range(3)], guide)
    batches = [[column() for _ in range(3)] for _ in range(args.steps)]
    t0 = time.perf_counter()
    for cols in batches:
        optimizer_step(cfg, student, loss_fn, state, cols, guide)
    dt = (time.perf_counter() - t0) / args.steps
    return {
        "mode": args.mode,
        "gradient_checkpointing": args.checkpointing,
        "trainable": trainable,
        "total": sum(p.numel() for p in student.parameters()),
        "step_s": round(dt, 3),
        "peak_extra_mib": round(_rss_mib("VmHWM") - loaded, 1),
        "model_resident_mib": round(loaded, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--mode", choices=["full", "lora"], help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(run_one(args)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build(Path(tmp), args)
        for mode, ckpt in SETTINGS:
            cmd = [sys.executable, __file__, "--mode", mode, "--model", str(model)]
            cmd += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                    if k in ("hidden", "layers", "vocab", "seq_len", "batch", "rank", "steps",
                             "threads")]  # fmt: skip
            cmd += ["--checkpointing"] if ckpt else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    if args.table:
        print("| student | checkpointing | trainable params | step s | peak training MiB |")
        print("|---|---|---:|---:|---:|")
        for r in rows:
            print(
                f"| {r['mode']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
                f"{r['trainable']:,} of {r['total']:,} | {r['step_s']:.2f} | "
                f"{r['peak_extra_mib']:.0f} |"
            )


if __name__ == "__main__":
    main()
