"""Prompts and instructions (gist_scale.model.prompts): prompt tokens left out of pooling exactly as
sentence-transformers leaves them out, and an exported model whose `encode(..., prompt_name=...)` gives the
trainer's own embeddings."""

from __future__ import annotations

import json
import shutil

import datasets
import pytest
import torch
import yaml

from gist_scale.config import ConfigError, DataConfig, ModelConfig
from gist_scale.options import load_config
from gist_scale.data import TripletCollator, load_triplets, tokenize_triplets
from gist_scale.encode import encode_columns
from gist_scale.inference import encode_texts
from gist_scale.model import load_tokenizer, pool
from gist_scale.model.prompts import Prompts, prompt_length
from gist_scale.st_format import load_sentence_transformer_dir
from gist_scale.train import main

ST_MODES = {"cls": "cls", "mean": "mean", "last_token": "lasttoken"}


@pytest.mark.parametrize("pooling", list(ST_MODES))
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_prompt_tokens_leave_pooling_as_in_sentence_transformers(pooling, padding_side):
    """Our per-text prompt exclusion equals sentence-transformers' `Pooling(include_prompt=False)` (which takes
    one prompt length per batch), for left padding (its PR 2951) and right padding."""
    from sentence_transformers.models import Pooling

    torch.manual_seed(0)
    lengths = torch.tensor([9, 5, 7, 6])
    width = 9
    positions = torch.arange(width)[None]
    mask = (positions >= width - lengths[:, None]) if padding_side == "left" else (positions < lengths[:, None])
    mask = mask.long()
    hidden = torch.randn(4, width, 8)
    reference = Pooling(8, pooling_mode=ST_MODES[pooling], include_prompt=False)
    for prompt in (0, 3):
        want = reference({"token_embeddings": hidden, "attention_mask": mask, "prompt_length": prompt})
        got = pool(hidden, mask, pooling, torch.full((4,), prompt))
        torch.testing.assert_close(got, want["sentence_embedding"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("model", ["minilm", "qwen3", "llama"])
def test_prompt_length_is_counted_as_sentence_transformers_counts_it(model, tiny_decoder_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    from gist_scale.model import resolve_model_path

    source = (resolve_model_path("sentence-transformers/all-MiniLM-L6-v2") if model == "minilm"
              else str(tiny_decoder_dir(model)))
    path = shutil.copytree(source, tmp_path / "model")
    tokenizer = load_tokenizer(str(path))
    tokenizer.save_pretrained(path)  # a decoder's with its EOS post-processor, as the export saves it
    reference = SentenceTransformer(str(path), device="cpu")
    for prompt in ("query: ", "Instruct: Given a gloss, find its example\nQuery: ", "x"):
        assert prompt_length(tokenizer, prompt) == reference[0]._get_prompt_length(prompt) > 0


def test_query_prompt_template_needs_its_instruction_field():
    with pytest.raises(ConfigError, match=r"model.query_prompt_template=.*must contain \{instruction\}"):
        load_config(["--model.query_prompt_template", "Query: "])
    assert load_config(["--guide.query_prompt_template", "null"]).guide.query_prompt_template is None


def test_task_instructions_replace_the_query_prompt_of_their_tasks():
    prompts = Prompts(query="q: ", document="d: ", template="Instruct: {instruction}\nQuery: ",
                      instructions=(("a", "find a"),))
    assert prompts.for_query("a") == "Instruct: find a\nQuery: " and prompts.for_query("b") == "q: "
    assert prompts.named() == {"query": "q: ", "document": "d: ", "a": "Instruct: find a\nQuery: "}
    assert Prompts(query="q: ", instructions=(("a", "x"),)).for_query("a") == "q: "  # template null: unused


def test_bad_task_instructions_file_fails_before_training(tmp_path, capsys):
    bad = tmp_path / "instructions.yaml"
    bad.write_text("- not a map\n")
    code = main(["--data.task_instructions", str(bad), "--train.output_dir", str(tmp_path / "run")])
    assert code == 2
    assert f"data.task_instructions={bad}: expected a non-empty map" in capsys.readouterr().err


CASES = {
    # student, pooling, pool_prompt, padding side
    "bert-mean-no-prompt-pooling": ("bert", "mean", False, "right"),
    "qwen3-last-token": ("qwen3", "last_token", True, "left"),
    "llama-mean-no-prompt-pooling-left": ("llama", "mean", False, "left"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exported_prompts_embed_like_the_trainer(case, tiny_model_dir, tiny_decoder_dir, tmp_path, capsys):
    """Train 2 steps with a query prompt, a document prompt and per-task instructions, export, and load the result
    in sentence-transformers: `encode(q, prompt_name="query")` (and `"document"`, and a task's name) equals what the
    training data path (cached tokenization, collator, Embedder) computes for the same texts, to 1e-5."""
    from sentence_transformers import SentenceTransformer

    family, pooling, pool_prompt, padding_side = CASES[case]
    student = tiny_model_dir if family == "bert" else tiny_decoder_dir(family)
    instructions = tmp_path / "instructions.yaml"
    instructions.write_text(yaml.safe_dump({"verb.motion": "Given a gloss of a motion verb, find its example",
                                            "noun.unknown": "not in the data"}))
    run = tmp_path / "run"
    code = main(["--model.name", str(student), "--model.pooling", pooling, "--model.pool_prompt", str(pool_prompt),
                 "--model.query_prompt", "query: ", "--model.document_prompt", "passage: ",
                 "--data.task_instructions", str(instructions), "--guide.name", "null", "--data.max_rows", "64",
                 "--train.batch_size", "8", "--train.max_steps", "2", "--optim.lr", "1e-3",
                 "--train.output_dir", str(run)])
    assert code == 0
    err = capsys.readouterr().err
    assert "data.task_instructions names task(s) that the data does not have" in err and "noun.unknown" in err
    final = run / "final"
    st_config = json.loads((final / "config_sentence_transformers.json").read_text())
    template = "Instruct: Given a gloss of a motion verb, find its example\nQuery: "
    assert st_config["prompts"] == {"query": "query: ", "document": "passage: ", "verb.motion": template,
                                    "noun.unknown": "Instruct: not in the data\nQuery: "}
    assert json.loads((final / "1_Pooling" / "config.json").read_text())["include_prompt"] is pool_prompt

    embedder, tokenizer, max_length = load_sentence_transformer_dir(str(final))
    assert embedder.prompts == st_config["prompts"] and embedder.include_prompt is pool_prompt
    tokenizer.padding_side = padding_side
    embedder.eval()
    # The trainer's data path on rows of two tasks, one of them instructed.
    rows, _ = load_triplets(DataConfig(max_rows=64))
    rows = rows.select([i for i, task in enumerate(rows["task_name"]) if task in ("verb.motion", "noun.act")][:6])
    prompts = Prompts.from_config(ModelConfig(name=str(final), pooling=pooling, query_prompt="query: ",
                                              document_prompt="passage: ", pool_prompt=pool_prompt),
                                  {"verb.motion": "Given a gloss of a motion verb, find its example"})
    tokenized, _ = tokenize_triplets(rows, tokenizer, max_length, student_prompts=prompts)
    batch = TripletCollator(tokenizer, chunks=2)([tokenized[i] for i in range(len(tokenized))])
    with torch.no_grad():
        query, pos, _ = encode_columns(embedder, batch.student, 1)

    reference = SentenceTransformer(str(final), device="cpu")
    reference.tokenizer.padding_side = padding_side
    motion = [i for i, task in enumerate(rows["task_name"]) if task == "verb.motion"]
    other = [i for i, task in enumerate(rows["task_name"]) if task != "verb.motion"]
    assert motion and other
    queries = rows["query"]
    checks = [(query[motion], reference.encode([queries[i] for i in motion], prompt_name="verb.motion")),
              (query[other], reference.encode([queries[i] for i in other], prompt_name="query")),
              (pos, reference.encode(rows["pos"], prompt_name="document"))]
    for ours, theirs in checks:
        torch.testing.assert_close(ours, torch.as_tensor(theirs), rtol=0, atol=1e-5)
    # Evaluation prepends the same prompt and embeds the same way.
    torch.testing.assert_close(encode_texts(embedder, tokenizer, [queries[i] for i in other], max_length, 4, "cpu",
                                            prompt="query: "), query[other], rtol=0, atol=1e-5)


def test_guide_prompts_are_part_of_the_guide_cache_key(tiny_model_dir):
    from gist_scale.config import GuideConfig
    from gist_scale.guide_cache import cache_key

    ds = datasets.Dataset.from_dict({"query": ["a"], "pos": ["b"], "negs": [["c"]], "task_name": ["t"]})
    plain = cache_key(GuideConfig(name=str(tiny_model_dir)), ds, 1)
    prompted = cache_key(GuideConfig(name=str(tiny_model_dir), query_prompt="q: "), ds, 1)
    instructed = cache_key(GuideConfig(name=str(tiny_model_dir), query_prompt_template="I: {instruction} Q: "),
                           ds, 1, {"t": "find"})
    assert plain["prompts"] != prompted["prompts"] != instructed["prompts"] != plain["prompts"]


# BERT has absolute positions and pads on the right; the decoder gets positions from the mask, so either side.
@pytest.mark.parametrize(("student", "padding_side"), [("bert", "right"), ("llama", "left"), ("llama", "right")])
def test_prompt_lengths_travel_through_columns_chunks_and_grad_cache(student, padding_side, tiny_model_dir,
                                                                     tiny_decoder_dir):
    """With prompts left out of mean pooling, each text's prompt length rides along with its ids: a padded batch
    (one call per column, chunked, GradCache) embeds each text as it is embedded alone with its own prompt length
    (per-task query prompts of different lengths in one batch)."""
    from gist_scale.encode import GradCache
    from gist_scale.model import load_student

    path = str(tiny_model_dir if student == "bert" else tiny_decoder_dir(student))
    tokenizer = load_tokenizer(path)
    tokenizer.padding_side = padding_side
    model = load_student(ModelConfig(name=path, pooling="mean", normalize=False, pool_prompt=False)).eval()
    prompts = Prompts(query="query: ", document="a passage: ", template="Instruct: {instruction}\nQuery: ",
                      instructions=(("long", "find the example sentence that uses this sense of the word"),),
                      include_prompt=False)
    ds = datasets.Dataset.from_dict({"query": ["a dog", "a cat that sleeps", "x"], "pos": ["barks", "purrs", "y z"],
                                     "negs": [["meows"], ["a very long negative text about turtles"], ["w"]],
                                     "task_name": ["long", "short", "long"]})
    tokenized, _ = tokenize_triplets(ds, tokenizer, 64, student_prompts=prompts)
    rows = [tokenized[i] for i in range(len(tokenized))]
    assert [row["student_query_prompt"] for row in rows] == [
        prompt_length(tokenizer, prompts.for_query(task)) for task in ds["task_name"]]

    def alone(ids: list[int], length: int) -> torch.Tensor:
        ids_t = torch.tensor([ids])
        return model(ids_t, torch.ones_like(ids_t), torch.tensor([length]))[0]

    with torch.no_grad():
        want = [torch.stack([alone(r["student_query"], r["student_query_prompt"]) for r in rows]),
                torch.stack([alone(r["student_pos"], r["student_pos_prompt"]) for r in rows]),
                torch.stack([alone(r["student_negs"][0], r["student_negs_prompt"][0]) for r in rows])[:, None]]
        got = {"columns": encode_columns(model, TripletCollator(tokenizer)(rows).student, 1),
               "chunked": encode_columns(model, TripletCollator(tokenizer, chunks=4)(rows).student, 1)}
    got["grad_cache"] = GradCache(model, TripletCollator(tokenizer, chunks=2)(rows).student, 1).embeddings
    for mode, embeddings in got.items():
        for ours, reference in zip(embeddings, want):
            torch.testing.assert_close(ours.detach(), reference, rtol=0, atol=1e-5, msg=mode)
