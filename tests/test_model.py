"""The Embedder's encoder call, and models whose architecture is code in their own repository
(`trust_remote_code`) (gist_scale.model)."""

from __future__ import annotations

import json

import pytest
import torch

from gist_scale.model import SDPA_MASK_MODEL_TYPES, Embedder, pool


@pytest.mark.parametrize("model_type", SDPA_MASK_MODEL_TYPES)
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_embeddings_equal_the_encoder_with_its_own_2d_mask(model_type, attention):
    """Under sdpa the Embedder hands the encoder a ready 4D mask (no host read of the mask per call); the
    embeddings equal those of the encoder given the usual 2D mask, for every listed encoder family and padding."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(model_type, vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=80,
                                  pad_token_id=1, attn_implementation=attention)
    torch.manual_seed(0)
    encoder = AutoModel.from_config(config, add_pooling_layer=False).eval()
    assert encoder.config._attn_implementation == attention
    lengths = torch.tensor([9, 3, 6, 1])
    mask = (torch.arange(9)[None] < lengths[:, None]).long()
    ids = torch.randint(5, 120, (4, 9)) * mask + 1 * (1 - mask)
    embedder = Embedder(encoder, "mean", True)
    with torch.no_grad():
        got = embedder(ids, mask)
        hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        want = torch.nn.functional.normalize(pool(hidden, mask, "mean"), dim=-1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_an_unknown_pooling_is_refused_not_pooled_as_another():
    """A Python caller's misspelt pooling fails with the names that work (the config refuses it for the CLI)."""
    with pytest.raises(ValueError, match="unknown pooling 'max': use cls, mean or last_token"):
        pool(torch.zeros(2, 3, 4), torch.ones(2, 3), "max")


# ------------------------------------------------------------------------------- trust_remote_code

_CONFIG_CODE = '''from transformers import BertConfig


class TinyCustomConfig(BertConfig):
    model_type = "tinycustom"
'''
_MODELING_CODE = '''from transformers import BertModel

from .configuration_tinycustom import TinyCustomConfig


class TinyCustomModel(BertModel):
    """A BERT under a model type transformers does not know, declared without sdpa, as many custom encoders are."""

    config_class = TinyCustomConfig
    _supports_sdpa = False
'''
_TOKENIZER_CODE = '''from transformers import BertTokenizer


class TinyCustomTokenizer(BertTokenizer):
    pass
'''
TEXTS = ["a cat sat on the mat", "quantum chromodynamics", "x"]


@pytest.fixture
def custom_code_model_dir(tmp_path, tiny_model_dir):
    """The tiny BERT as a model whose architecture and tokenizer are code in its own directory (`auto_map`), like
    the many hub embedders that need `trust_remote_code`. A directory name of its own per test: transformers names
    the code's module after the directory and registers its classes with `AutoModel`, so a shared name would let
    one test's loads stand in for another's."""
    import shutil

    out = tmp_path / f"tinycustom_{tmp_path.name}"
    shutil.copytree(tiny_model_dir, out)
    (out / "configuration_tinycustom.py").write_text(_CONFIG_CODE)
    (out / "modeling_tinycustom.py").write_text(_MODELING_CODE)
    (out / "tokenization_tinycustom.py").write_text(_TOKENIZER_CODE)
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    tokenizer_config.update(tokenizer_class="TinyCustomTokenizer",
                            auto_map={"AutoTokenizer": [None, "tokenization_tinycustom.TinyCustomTokenizer"]})
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    config = json.loads((out / "config.json").read_text())
    config.update(model_type="tinycustom", architectures=["TinyCustomModel"],
                  auto_map={"AutoConfig": "configuration_tinycustom.TinyCustomConfig",
                            "AutoModel": "modeling_tinycustom.TinyCustomModel"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def _embed(embedder, tokenizer, texts=TEXTS):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return embedder(batch["input_ids"], batch["attention_mask"])


def test_trusted_custom_code_student_and_guide_load_and_embed(custom_code_model_dir, tiny_model_dir):
    """With trust_remote_code the student, the guide and the tokenizer load the directory's own classes, with its
    weights: they embed as the same weights in transformers' BERT do."""
    from gist_scale.config import GuideConfig, ModelConfig
    from gist_scale.model import load_guide, load_student, load_tokenizer

    path = str(custom_code_model_dir)
    tokenizer = load_tokenizer(path, trust_remote_code=True)
    student = load_student(ModelConfig(name=path, trust_remote_code=True, attn_implementation="eager"))
    guide = load_guide(GuideConfig(name=path, trust_remote_code=True, dtype="fp32"), torch.device("cpu"))
    assert type(student.encoder).__name__ == type(guide.encoder).__name__ == "TinyCustomModel"
    assert type(tokenizer).__name__ == "TinyCustomTokenizer"
    plain = load_student(ModelConfig(name=str(tiny_model_dir), attn_implementation="eager"))
    want = _embed(plain.eval(), tokenizer)
    assert want.shape == (3, 32)
    torch.testing.assert_close(_embed(student.eval(), tokenizer), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(_embed(guide, tokenizer), want, rtol=0, atol=1e-6)


def test_trusted_custom_code_without_sdpa_is_refused_by_its_own_class(custom_code_model_dir):
    """The sdpa check looks at the class the directory's code defines, not at transformers' classes."""
    from gist_scale.config import ConfigError, ModelConfig
    from gist_scale.model import load_student

    with pytest.raises(ConfigError) as error:
        load_student(ModelConfig(name=str(custom_code_model_dir), trust_remote_code=True))
    assert str(error.value) == ("model.attn_implementation=sdpa: TinyCustomModel has no sdpa attention in "
                                "transformers; use --model.attn_implementation eager")


@pytest.mark.parametrize("what", ["student", "guide", "tokenizer", "guide tokenizer"])
def test_custom_code_without_trust_remote_code_is_one_line_naming_the_option(what, custom_code_model_dir):
    """Off by default: no code of the model's runs, no interactive prompt, and the refusal is one line naming the
    section's option."""
    from gist_scale.config import ConfigError, GuideConfig, ModelConfig
    from gist_scale.model import load_guide, load_student, load_tokenizer

    path = str(custom_code_model_dir)
    assert ModelConfig().trust_remote_code is False and GuideConfig().trust_remote_code is False
    load = {"student": lambda: load_student(ModelConfig(name=path, attn_implementation="eager")),
            "guide": lambda: load_guide(GuideConfig(name=path), torch.device("cpu")),
            "tokenizer": lambda: load_tokenizer(path),
            "guide tokenizer": lambda: load_tokenizer(path, None, False, "--guide.trust_remote_code true")}[what]
    option = "--guide.trust_remote_code true" if what.startswith("guide") else "--model.trust_remote_code true"
    with pytest.raises(ConfigError) as error:
        load()
    assert str(error.value) == (f"model {path}: it needs Python code from its repository (auto_map in its "
                                f"config.json or tokenizer_config.json), which runs only with {option}; set it if "
                                "you trust that code")


def test_custom_code_student_exports_its_code_for_sentence_transformers(custom_code_model_dir, tmp_path):
    """The export carries the code files and auto_map (transformers' save_pretrained copies them), so
    `SentenceTransformer(path, trust_remote_code=True)` loads the same class and embeds as the trainer; without the
    flag sentence-transformers refuses it, and `gist-scale eval`'s loader names --trust-remote-code."""
    from sentence_transformers import SentenceTransformer

    from gist_scale.config import ConfigError, ModelConfig
    from gist_scale.model import load_student, load_tokenizer
    from gist_scale.st_format import export_sentence_transformer, load_sentence_transformer_dir

    path = str(custom_code_model_dir)
    tokenizer = load_tokenizer(path, trust_remote_code=True)
    student = load_student(ModelConfig(name=path, trust_remote_code=True, attn_implementation="eager")).eval()
    out = export_sentence_transformer(student.encoder, tokenizer, "mean", True, 64, tmp_path / "export")
    for code in ("configuration_tinycustom.py", "modeling_tinycustom.py", "tokenization_tinycustom.py"):
        assert (out / code).is_file(), code
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModel"] == \
        "modeling_tinycustom.TinyCustomModel"
    want = _embed(student, tokenizer)

    st = SentenceTransformer(str(out), device="cpu", trust_remote_code=True)
    assert type(st[0].auto_model).__name__ == "TinyCustomModel" and type(st.tokenizer).__name__ == "TinyCustomTokenizer"
    torch.testing.assert_close(st.encode(TEXTS, convert_to_tensor=True), want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        SentenceTransformer(str(out), device="cpu")

    embedder, eval_tokenizer, _ = load_sentence_transformer_dir(str(out), trust_remote_code=True)
    torch.testing.assert_close(_embed(embedder.eval(), eval_tokenizer), want, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match=r"runs only with --trust-remote-code; set it if you trust that code$"):
        load_sentence_transformer_dir(str(out))


def test_eval_of_a_custom_code_model_needs_trust_remote_code(custom_code_model_dir, tmp_path, capsys):
    """`gist-scale eval` of an exported custom-code model: one line naming --trust-remote-code without it, metrics
    with it."""
    from gist_scale.config import ModelConfig
    from gist_scale.data import sample_data_path
    from gist_scale.evaluation.cli import main
    from gist_scale.model import load_student, load_tokenizer
    from gist_scale.st_format import export_sentence_transformer

    path = str(custom_code_model_dir)
    student = load_student(ModelConfig(name=path, trust_remote_code=True, attn_implementation="eager"))
    out = export_sentence_transformer(student.encoder, load_tokenizer(path, trust_remote_code=True), "mean", True,
                                      64, tmp_path / "export")
    data = tmp_path / "eval.jsonl"
    data.write_text("\n".join(sample_data_path("eval").read_text().splitlines()[:16]) + "\n")
    assert main([str(out), "--data", str(data)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "runs only with --trust-remote-code; set it if you trust that code" in errors[0]
    assert main([str(out), "--data", str(data), "--trust-remote-code", "--out", str(tmp_path / "m.json")]) == 0
    assert "ndcg@10" in json.loads((tmp_path / "m.json").read_text())["model"]


def test_training_a_custom_code_student_with_a_custom_code_guide(custom_code_model_dir, tmp_path, capsys):
    """`gist-scale train` passes each section's flag to its tokenizer and model: without them the run stops at once
    with one line naming the missing option; with them it trains, and the card's usage line carries the flag."""
    from sentence_transformers import SentenceTransformer

    from gist_scale.data import sample_data_path
    from gist_scale.train import main

    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(sample_data_path("train").read_text().splitlines()[:16]) + "\n")
    path, run = str(custom_code_model_dir), tmp_path / "run"
    args = ["--model.name", path, "--guide.name", path, "--model.attn_implementation", "eager",
            "--data.path", str(data), "--train.batch_size", "4", "--train.max_steps", "1",
            "--train.output_dir", str(run)]
    for flags, missing in (([], "--model.trust_remote_code true"),
                           (["--model.trust_remote_code", "true"], "--guide.trust_remote_code true")):
        assert main(args + flags) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1 and f"runs only with {missing}; set it if you trust that code" in errors[0], errors

    assert main(args + ["--model.trust_remote_code", "true", "--guide.trust_remote_code", "true"]) == 0
    final = run / "final"
    assert f'SentenceTransformer("{final}", trust_remote_code=True)' in (final / "README.md").read_text()
    st = SentenceTransformer(str(final), device="cpu", trust_remote_code=True)
    assert type(st[0].auto_model).__name__ == "TinyCustomModel"
    assert st.encode(TEXTS).shape == (3, 32)
