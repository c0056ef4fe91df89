"""The model card names the real models and shows the user's own data in its usage example."""

from __future__ import annotations

import ast
import json

from gist_ray.config import load_config
from gist_ray.core.assets import MINILM_HUB, MPNET_HUB
from gist_ray.models.card import CardInfo, render_card

MODEL = {
    "modules": ["Transformer", "Pooling"],
    "pooling": "mean",
    "max_seq_length": 256,
    "train_max_seq_length": 64,
    "dim": 384,
    "similarity": "cosine",
    "prompts": {},
}


def _card(cfg) -> str:
    return render_card(cfg, CardInfo(model=MODEL, rows={"faq": 3}, steps=2, world_size=2))


def _usage(card: str) -> tuple[str, str]:
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    calls = {
        node.func.attr: node.args[0].elts[0].value
        for node in ast.walk(ast.parse(code))  # the example must be valid Python
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "").startswith("encode_")
    }
    return calls["encode_query"], calls["encode_document"]


def test_card_names_the_real_models_not_aliases(tmp_path):
    data = tmp_path / "faq.jsonl"
    rows = [
        {"q": 'how do I reset my "router"?', "a": "Hold the reset button for 10 seconds."},
        {"q": "second question", "a": "second answer"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        overrides=[
            "model.student=minilm",
            "model.guide=mpnet",
            f"data.train={data}",
            "data.columns={anchor: q, positive: a}",
        ]
    )
    card = _card(cfg)
    assert f"fine-tuned from `{MINILM_HUB}`" in card and f"guided by `{MPNET_HUB}`" in card
    assert f"# {MINILM_HUB}, fine-tuned with GISTEmbed" in card
    assert f"base_model: {MINILM_HUB}" in card
    assert "`minilm`" not in card and "`mpnet`" not in card
    # the usage example is the first training row, not an insurance question
    assert _usage(card) == (rows[0]["q"], rows[0]["a"])
    assert "cancel my policy" not in card


def test_a_local_model_is_named_by_its_path(tmp_path, monkeypatch):
    folder = tmp_path / "models" / "my-student"
    folder.mkdir(parents=True)
    long_answer = " ".join(["word"] * 100)
    data = tmp_path / "d.csv"
    data.write_text(f"anchor,positive\nshort question,{long_answer}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(overrides=["model.student=models/my-student", f"data.train={data}"])
    card = _card(cfg)
    assert f"fine-tuned from `{folder}`" in card and "# my-student, fine-tuned" in card
    assert "base_model" not in card  # a local folder is no hub model
    query, document = _usage(card)
    assert query == "short question"
    assert document.endswith(" ...") and len(document) <= 204  # a long text is cut at a word
