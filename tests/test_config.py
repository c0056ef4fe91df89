import pytest

from gist_ray.config import Config, load_config, load_config_dict
from gist_ray.core.errors import ConfigError


def test_defaults_are_valid_and_roundtrip():
    cfg = load_config()
    assert cfg.train.batch_size % cfg.ray.num_workers == 0
    assert load_config_dict(cfg.to_dict()) == cfg


def test_yaml_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "train:\n  lr: 1.0e-4\n  batch_size: 8\nloss:\n  margin: 0.1\n"
        "data:\n  columns: {anchor: question, positive: answer}\n"
    )
    cfg = load_config(
        f,
        [
            "train.lr=5e-5",
            "loss.contrast_anchors=false",
            "data.columns.negative=bad_answer",
            "ray.address=auto",
        ],
    )
    assert cfg.train.lr == 5e-5 and cfg.train.batch_size == 8
    assert cfg.loss.margin == 0.1 and cfg.loss.contrast_anchors is False
    assert cfg.data.columns == {
        "anchor": "question",
        "positive": "answer",
        "negative": "bad_answer",
    }
    assert cfg.ray.address == "auto"


def test_matryoshka_and_hardness_settings():
    overrides = ["loss.matryoshka_dims=[384, 128, 32]", "loss.matryoshka_weights=[1, 0.5, 0.25]",
                 "loss.hardness_alpha=5", "loss.hardness_mode=all_negatives"]  # fmt: skip
    cfg = load_config(overrides=overrides)
    assert cfg.loss.matryoshka_dims == [384, 128, 32]
    assert cfg.loss.matryoshka_weights == [1.0, 0.5, 0.25]
    assert cfg.loss.hardness_alpha == 5.0 and cfg.loss.hardness_mode == "all_negatives"
    assert load_config_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"loss.matryoshka_weights has 2 values for 3 "):
        load_config(overrides=["loss.matryoshka_dims=[384, 128, 32]",
                               "loss.matryoshka_weights=[1, 2]"])  # fmt: skip


def test_flat_params_cover_every_key():
    flat = Config().flat()
    for key in (
        "model.student",
        "train.lr",
        "loss.temperature",
        "ray.num_workers",
        "mlflow.experiment",
        "output_dir",
    ):
        assert key in flat


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.foo=1", "unknown config key 'train.foo'"),
        ("nope=1", "unknown config key 'nope'"),
        ("train.lr=abc", "train.lr: expected a number"),
        ("train.batch_size=2.5", "train.batch_size: expected an integer"),
        ("loss.contrast_anchors=maybe", "loss.contrast_anchors: expected true or false"),
        ("loss.temperature=0", "loss.temperature = 0.0 is not allowed; must be > 0"),
        ("loss.temperature=-1", "loss.temperature"),
        ("loss.margin=-0.1", "loss.margin"),
        ("loss.margin_strategy=fancy", "one of absolute, relative"),
        ("loss.backend=cuda", "loss.backend"),
        ("model.pooling=maxi", "model.pooling = 'maxi' is not allowed"),
        ("model.max_seq_length=-1", "model.max_seq_length = -1 is not allowed"),
        ("model.export_max_seq_length=-2", "model.export_max_seq_length"),
        ("data.sampling=random", "data.sampling = 'random' is not allowed; one of proportional"),
        ("model.prompts={anchor: 3}", "model.prompts.anchor: expected a prompt"),
        ("model.prompts={nope: {anchor: q}}", "model.prompts = {'nope'"),
        ("data.train=[]", "data.train is empty"),
        ("data.train={a: {path: x.csv}}", "unknown config key 'data.train.a.path'"),
        ("data.train=[a/x.csv, b/x.csv]", "data.train[0], data.train[1]: two datasets are named"),
        ("data.train=[{source: x.csv, max_examples: -1}]", "data.train[0].max_examples = -1"),
        ("model.model_kwargs=[1]", "model.model_kwargs: expected a mapping"),
        ("train.batch_size=33", "divisible by ray.num_workers = 2"),
        ("train", "expected section.key=value"),
        ("loss.matryoshka_dims=256", "loss.matryoshka_dims: expected a list, got 256"),
        ("loss.matryoshka_dims=[256, x]", "loss.matryoshka_dims[1]: expected an integer"),
        ("loss.matryoshka_dims=[128, 256]", "loss.matryoshka_dims must be strictly decreasing"),
        ("loss.matryoshka_dims=[64, 0]", "loss.matryoshka_dims must be positive integers"),
        ("loss.matryoshka_weights=[1, 2]", "loss.matryoshka_weights is set but"),
        ("loss.hardness_alpha=-1", "loss.hardness_alpha = -1.0 is not allowed; must be >= 0"),
        ("loss.hardness_mode=hard", "loss.hardness_mode = 'hard' is not allowed; one of"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trian:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config(unknown)


def test_an_unknown_key_names_the_file_and_line_and_suggests_the_closest(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("model:\n  student: minilm\ntrain:\n  lr: 1.0e-5\n  epoch: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(
        f"unknown config key 'train.epoch' (line 5 of {path}); did you mean 'train.epochs'? "
        "allowed: train.batch_size, "
    )
    # the right name in the wrong section; a bad value names its line too
    path.write_text("train:\n  temperature: 0.05\n")
    with pytest.raises(ConfigError, match=r"\(line 2 of .*my.yaml\); did you mean 'loss.temp"):
        load_config(path)
    path.write_text("loss:\n  margin: 0.1\n  temperature: cold\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"loss.temperature: expected a number, got 'cold' (line 3 of {path})"
    # --set names itself
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["train.learning_rate=1e-5"])
    assert str(e.value).startswith(
        "unknown config key 'train.learning_rate' (--set train.learning_rate=1e-5); "
        "did you mean 'train.lr'?"
    )


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("trian", "train"),
        ("train.epoch", "train.epochs"),
        ("loss.temprature", "loss.temperature"),
        ("model.studnet", "model.student"),
        ("model.lora.rnk", "model.lora.rank"),
        ("eval.max_query", "eval.max_queries"),
        ("mlflow.experiment_name", "mlflow.experiment"),
        ("train.temperature", "loss.temperature"),
        ("train.num_train_epochs", "train.epochs"),
        ("train.nope", None),
    ],
)
def test_suggest_finds_the_closest_key(typo, meant):
    from gist_ray.config.load import suggest

    assert suggest(typo) == meant


def test_model_keys_default_to_the_models_own_settings():
    m = Config().model
    assert (m.pooling, m.guide_pooling, m.export_max_seq_length) == ("", "", 0)
    assert m.prompts is None and m.guide_prompts is None  # the models' own prompts
    assert m.max_seq_length == 64  # the CPU demo's training truncation; 0 = the model's own
    d = Config().data
    assert d.no_duplicates and d.sampling == "proportional"


def test_several_datasets_prompts_and_model_kwargs_roundtrip():
    from gist_ray.config import train_datasets

    cfg = load_config(
        overrides=[
            "data.train={faq: {source: faq.jsonl, columns: {anchor: q, positive: a}, "
            "max_examples: 10, prompts: {anchor: 'query: '}}, qa: insuranceqa}",
            "model.prompts.qa.anchor=q2",
            "model.model_kwargs.dtype=bfloat16",
            "model.guide_model_kwargs={attn_implementation: eager}",
            "data.sampling=round_robin",
        ]
    )
    assert load_config_dict(cfg.to_dict()) == cfg
    faq, qa = train_datasets(cfg.data)
    assert (faq.name, faq.source, faq.max_examples) == ("faq", "faq.jsonl", 10)
    assert faq.columns == {"anchor": "q", "positive": "a"} and faq.prompts == {"anchor": "query: "}
    assert (qa.name, qa.source, qa.max_examples, qa.prompts) == ("qa", "insuranceqa", 1024, None)
    assert cfg.model.prompts == {"qa": {"anchor": "q2"}}
    assert cfg.model.model_kwargs == {"dtype": "bfloat16"}
    listed = load_config(overrides=["data.train=[insuranceqa, dir/pairs.jsonl]"])
    assert [s.name for s in train_datasets(listed.data)] == ["insuranceqa", "pairs"]
