"""The exported model's README.md: a Hugging Face model card (YAML metadata, then Markdown) saying
what the model is, how to use it, and how gist-ray trained it — base model, guide, data, loss and
its settings, batch, steps — and how it scored before and after.

Models are named as they really are — a built-in alias (``minilm``) as the hub model it stands
for, a local folder by its absolute path — and the usage example is the first training row's
anchor and positive, so the card speaks of the user's data."""

from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import json
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from gist_ray.config import SELF, Config, train_datasets
from gist_ray.core.errors import GistRayError

_HUB_ID = "/"  # a hub model id has an organisation: org/name


@dataclass
class CardInfo:
    """What the card reports beyond the config."""

    model: dict[str, Any]  # gist_ray.models.encoder.describe() of the exported model
    rows: dict[str, int]  # dataset name -> training rows
    steps: int
    world_size: int
    eval_name: str = ""
    eval_size: str = ""  # e.g. "150 queries, 1,000 documents"
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    example: tuple[str, str] | None = None  # (query, document); None = the first training row


def _base_model(name: str) -> str | None:
    from gist_ray.core.assets import MODEL_ALIASES

    hub = MODEL_ALIASES.get(name) or next(
        (v for k, v in MODEL_ALIASES.items() if k.lower() == name.lower()), None
    )
    return hub or (name if name.count(_HUB_ID) == 1 and not name.startswith((".", "/")) else None)


def model_name(name: str) -> str:
    """The model ``name`` really is: a local folder's absolute path, the hub model an alias
    stands for (``minilm`` -> ``sentence-transformers/all-MiniLM-L6-v2``), else the hub name."""
    path = os.path.expanduser(name)
    if os.path.exists(path):
        return os.path.abspath(path)
    return _base_model(name) or name


def _short(name: str) -> str:
    """A title's name: a hub id as it is, a local folder by its own name."""
    return os.path.basename(name.rstrip("/")) if os.path.isabs(name) else name


EXAMPLE_CHARS = 200  # a longer training text is cut at a word for the usage example
FALLBACK_EXAMPLE = ("how do I cancel my policy", "You can cancel at any time by ...")


def usage_example(cfg: Config) -> tuple[str, str]:
    """The first training row's anchor and positive (of the first dataset), as the card's usage
    example; a generic pair when the data cannot be read here."""
    from gist_ray.data.training import BUILTIN, load_pairs

    spec = train_datasets(cfg.data)[0]
    builtin = spec.source.strip().lower() == BUILTIN
    # A user's file keeps its first rows, so one row is enough; the built-in set is read as
    # training read it (its cached sample), whose first row depends on the sample size.
    rows = (spec.max_examples or None) if builtin else 1
    try:
        first = load_pairs(spec.source, spec.columns or None, rows, seed=cfg.train.seed)[0]
    except (GistRayError, OSError):
        return FALLBACK_EXAMPLE
    return _cut(first["anchor"]), _cut(first["positive"])


def _cut(text: str) -> str:
    text = " ".join(text.split())
    if len(text) <= EXAMPLE_CHARS:
        return text
    return text[:EXAMPLE_CHARS].rsplit(" ", 1)[0] + " ..."


def render_card(cfg: Config, info: CardInfo) -> str:
    """The model card text."""
    m, t, lo = cfg.model, cfg.train, cfg.loss
    specs = train_datasets(cfg.data)
    meta: dict[str, Any] = {
        "library_name": "sentence-transformers",
        "pipeline_tag": "sentence-similarity",
        "tags": ["sentence-transformers", "sentence-similarity", "feature-extraction", "gist-ray"],
    }
    local = os.path.exists(os.path.expanduser(m.student))  # a folder is no hub base model
    if not local and (base := _base_model(m.student)):
        meta["base_model"] = base
    student = model_name(m.student)
    query, document = info.example or usage_example(cfg)
    hub_data = [s.source for s in specs if s.source.count(_HUB_ID) == 1 and "." not in s.source]
    if hub_data:
        meta["datasets"] = hub_data
    d = info.model
    prompts = d.get("prompts") or {}
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).strip(),
        "---",
        "",
        f"# {_short(student)}, fine-tuned with GISTEmbed",
        "",
        f"A sentence-transformers model fine-tuned from `{student}` by gist-ray with the "
        f"GISTEmbed loss (arXiv:2402.16829), guided by {_guide_text(m)}.",
        "",
        "## Model",
        "",
        f"- modules: {' → '.join(d['modules'])} (pooling: {d['pooling']})",
        f"- max sequence length: {d['max_seq_length']} tokens "
        f"(trained with truncation at {d['train_max_seq_length']})",
        f"- embedding dimension: {d['dim']}; similarity: {d['similarity']}",
        f"- prompts: {json.dumps(prompts) if prompts else 'none'}",
        "",
        "## Usage",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        'model = SentenceTransformer("path/to/this/folder")',
        f"queries = model.encode_query([{_literal(query)}])",
        f"documents = model.encode_document([{_literal(document)}])",
        "scores = model.similarity(queries, documents)",
        "```",
        "",
        "## Training",
        "",
        "| dataset | source | rows | columns |",
        "|---|---|---:|---|",
    ]
    for s in specs:
        cols = ", ".join(f"{k}={v}" for k, v in s.columns.items()) or "anchor, positive[, negative]"
        lines.append(f"| {s.name} | `{s.source}` | {info.rows.get(s.name, 0):,} | {cols} |")
    local = t.batch_size // max(info.world_size, 1)
    lines += [
        "",
        f"- loss: GISTEmbed (guide {_guide_text(m)}), temperature {lo.temperature}, margin "
        f"{lo.margin} ({lo.margin_strategy}), contrast anchors {str(lo.contrast_anchors).lower()}"
        f", contrast positives {str(lo.contrast_positives).lower()}",
        f"- global batch {t.batch_size} ({info.world_size} worker(s) × {local}), every query "
        f"scored against the whole global batch; mini-batch {t.mini_batch_size or 'off'}; "
        f"no duplicate texts in a batch: {str(cfg.data.no_duplicates).lower()}"
        + (f"; sampling {cfg.data.sampling}" if len(specs) > 1 else ""),
        f"- {info.steps} steps, AdamW lr {t.lr:g}, warm-up {t.warmup_ratio:g}, weight decay "
        f"{t.weight_decay:g}, gradient clipping {t.max_grad_norm:g}, seed {t.seed}",
        f"- training prompts: {_prompts_text(m.prompts, 'the model')}; guide prompts: "
        f"{_prompts_text(m.guide_prompts, 'the guide')}",
    ]
    if m.lora.rank:
        targets = ", ".join(m.lora.target_modules) or "PEFT's defaults"
        lines.append(
            f"- LoRA rank {m.lora.rank}, alpha {m.lora.alpha or 2 * m.lora.rank:g}, dropout "
            f"{m.lora.dropout:g} on {targets}; exported "
            + ("merged into the weights" if m.lora_export == "merged" else "as the adapter")
        )
    if t.guide_warmup_steps:
        lines.append(f"- guide warm-up: plain InfoNCE (no mask) for {t.guide_warmup_steps} steps")
    if info.after:
        lines += [
            "",
            "## Evaluation",
            "",
            f"Retrieval on {info.eval_name} ({info.eval_size}), each model at its own max length "
            "and prompts:",
            "",
            "| metric | base model | this model |",
            "|---|---:|---:|",
        ]
        for k in ("ndcg@10", "recall@10", "mrr@10", "map@100"):
            if k in info.after:
                lines.append(
                    f"| {k} | {info.before.get(k, float('nan')):.4f} | {info.after[k]:.4f} |"
                )
    lines += ["", "## Framework versions", ""]
    for name in ("gist-ray", "sentence-transformers", "transformers", "torch"):
        try:
            lines.append(f"- {name} {md.version(name)}")
        except md.PackageNotFoundError:
            pass
    lines.append(f"- trained {dt.date.today().isoformat()}")
    return "\n".join(lines) + "\n"


def _literal(text: str) -> str:
    """A Python string literal of ``text`` (JSON's escapes are Python's)."""
    return json.dumps(text, ensure_ascii=False)


def _guide_text(m) -> str:
    if m.guide != SELF:
        return f"`{model_name(m.guide)}`"
    if m.self_guide == "ema":
        return f"the model itself (an EMA of its weights, decay {m.self_guide_decay:g})"
    return "the model itself, frozen at the start of training"


def _prompts_text(value: Any, whose: str) -> str:
    if value is None:
        return f"{whose}'s own"
    return json.dumps(value) if value else "none"
