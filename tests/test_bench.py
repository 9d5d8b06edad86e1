"""`gist-scale bench` on CPU with the tiny config: the records are complete and comparable (no timing claims)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gist_scale import cli
from gist_scale.chunking import pack_columns
from gist_scale.data import TripletCollator
from gist_scale.flops import forward_flops
from gist_scale.model import load_tokenizer
from gist_scale.tools import bench
from gist_scale.tools.bench import inputs, modes
from gist_scale.tools.bench.timing import RECORD_FIELDS

REPO = Path(__file__).resolve().parents[1]

TINY = ["--cases", "tiny", "--batch", "8", "--query-len", "4-12", "--doc-len", "12-40", "--steps", "2", "--warmup",
        "1", "--chunk-size", "8", "--dropout", "0", "--threads", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    assert cli.main(["bench", *TINY, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def collated_student(tmp_path: Path, size: str, rows: int, query_len: tuple[int, int],
                     doc_len: tuple[int, int]) -> dict:
    """The student's columns of the bench's synthetic rows as the trainer collates them (its tokenizer, loaded from
    the bench's model directory, and its collator)."""
    tokenizer = load_tokenizer(str(inputs.build_model_dir(size, tmp_path, 0.0, 0)))
    path = inputs.write_rows(tmp_path / f"{size}.jsonl", rows, query_len, doc_len, size in inputs.DECODER_SIZES, 0)
    texts = [json.loads(line) for line in path.read_text().splitlines()]
    ids = {column: [tokenizer(row[column])["input_ids"] for row in texts] for column in ("query", "pos", "neg")}
    tokenized = [{"student_query": query, "student_pos": pos, "student_negs": [neg]}
                 for query, pos, neg in zip(ids["query"], ids["pos"], ids["neg"])]
    return TripletCollator(tokenizer)(tokenized).student


def test_every_mode_has_a_complete_record(records):
    assert [r["mode"] for r in records] == list(modes.MODES)
    for r in records:
        missing = [f for f in RECORD_FIELDS if f not in r]
        assert not missing, f"{r['mode']}: missing {missing}"
        assert r["case"] == "tiny/tiny" and r["batch"] == 8 and r["oom"] is False and r["steps"] == 2
        for field in ("triplets_per_s", "real_tokens_per_s", "model_tflops_per_s", "ratio_vs_st"):
            assert isinstance(r[field], float) and math.isfinite(r[field]) and r[field] > 0, (r["mode"], field)
        assert 0.0 <= r["padding_fraction"] < 1.0
        assert r["peak_mem_gib"] is None and r["mfu"] is None  # CPU: no accelerator memory, no known peak
        assert r["versions"]["torch"] and r["versions"]["sentence-transformers"]
    assert records[0]["ratio_vs_st"] == 1.0


def test_modes_train_the_same_model_on_the_same_batches(records):
    """With dropout 0, the first step's loss is the same for sentence-transformers and every mode of ours."""
    reference = records[0]["first_loss"]
    for r in records[1:]:
        assert r["first_loss"] == pytest.approx(reference, abs=1e-4), r["mode"]


def test_chunked_modes_process_less_padding(records):
    by_mode = {r["mode"]: r for r in records}
    assert by_mode["chunked"]["padding_fraction"] < by_mode["plain"]["padding_fraction"]
    assert by_mode["plain"]["padding_fraction"] == by_mode["st"]["padding_fraction"]
    assert by_mode["chunked"]["chunk_size"] == 8 and by_mode["plain"]["chunk_size"] is None


def test_matryoshka_modes_match_sentence_transformers(tmp_path):
    """`matryoshka` (ours) and `st_matryoshka` (MatryoshkaLoss(GISTEmbedLoss)) train the same loss: equal first
    losses with dropout 0, different from plain GIST's."""
    out = tmp_path / "matryoshka.json"
    assert cli.main(["bench", *TINY, "--modes", "plain,matryoshka,st_matryoshka", "--matryoshka-dims", "32,8",
                     "--out", str(out)]) == 0
    by_mode = {r["mode"]: r for r in json.loads(out.read_text())}
    assert by_mode["matryoshka"]["matryoshka_dims"] == by_mode["st_matryoshka"]["matryoshka_dims"] == [32, 8]
    assert by_mode["plain"]["matryoshka_dims"] is None
    assert by_mode["matryoshka"]["first_loss"] == pytest.approx(by_mode["st_matryoshka"]["first_loss"], abs=1e-4)
    assert abs(by_mode["matryoshka"]["first_loss"] - by_mode["plain"]["first_loss"]) > 1e-2
    assert all(r["triplets_per_s"] > 0 for r in by_mode.values())
    with pytest.raises(SystemExit):
        bench.parse_args(["--matryoshka-dims", "0,8"])


def test_synthetic_batches_and_flops(tmp_path):
    batch = collated_student(tmp_path, "tiny", 5, (3, 6), (7, 9))
    lengths = {c: f["attention_mask"].sum(1) for c, f in batch.items()}
    assert lengths["query"].min() >= 3 and lengths["query"].max() <= 6 and lengths["pos"].min() >= 7
    for features in batch.values():
        ids, mask = features["input_ids"], features["attention_mask"]
        assert (ids[:, 0] == inputs.CLS).all()
        assert (ids.gather(1, (mask.sum(1) - 1)[:, None]) == inputs.SEP).all()
        assert (ids[mask == 0] == inputs.PAD).all()
    packed, counts = pack_columns(batch)
    assert counts == {"query": 5, "pos": 5, "neg": 5} and packed["input_ids"].shape[0] == 15

    class Config:
        hidden_size, num_hidden_layers, intermediate_size = 4, 2, 8

    # 2 layers x (4*16 + 2*4*8) = 256 weights per token -> 512 FLOPs/token; attention 4*2*4*l^2 = 32 l^2.
    assert forward_flops(Config, 1 + 2, 1 + 4) == 512 * 3 + 32 * 5


def test_bad_arguments_are_refused(capsys):
    for lengths in ("1,2", "x-9"):  # not MIN-MAX whole numbers: the same one line as a range out of bounds
        with pytest.raises(SystemExit):
            bench.parse_args(["--query-len", lengths])
        assert f"argument --query-len: '{lengths}': expected MIN-MAX token lengths" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--modes", "st,warp"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--cases", "huge/base"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--query-len", "9-3"])
    cfg = bench.parse_args(["--cases", "small/large,tiny", "--device", "cpu"])
    assert cfg.cases == [("small", "large"), ("tiny", "tiny")] and cfg.peak_tflops is None


def test_commands_are_registered():
    assert cli.COMMANDS["bench"][0] == "gist_scale.tools.bench"
    assert cli.COMMANDS["cache-guide"][0] == "gist_scale.guide_cache"


@pytest.mark.slow
def test_gpu_bench_script_runs_end_to_end_in_smoke_mode(tmp_path, torch_extensions_dir):
    """`launch/bench_gpu.sh` is run on a GPU only when one is lent (minutes at a time), so CI runs its bench
    invocations and its mining run at the tiny size on the CPU (`BENCH_SMOKE=1`): each must exit 0 and write
    complete records. Its two parts run at once, each into its own OUT: every invocation is one single-threaded
    process, so on 2 cores the LLM part costs no wall time of its own."""
    env = dict(os.environ, BENCH_SMOKE="1", OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=torch_extensions_dir,
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    parts = {"bert": [], "llm": ["llm"]}  # part 1, BERT students and mining; part 2, a tiny Qwen3 for 0.6B and 8B
    procs = {}
    for part, args in parts.items():
        (tmp_path / part).mkdir()
        with (tmp_path / f"{part}.log").open("w") as log:
            procs[part] = subprocess.Popen(["bash", str(REPO / "launch" / "bench_gpu.sh"), *args],
                                           env=dict(env, OUT=str(tmp_path / part)), cwd=REPO, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 900
    for proc in procs.values():
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for other in procs.values():  # each script's session: the script and the bench it runs
                if other.poll() is None:
                    os.killpg(other.pid, signal.SIGKILL)
            raise
    logs = {part: (tmp_path / f"{part}.log").read_text(errors="replace") for part in parts}
    for part, proc in procs.items():
        assert proc.returncode == 0, logs[part][-4000:]

    out, log = tmp_path / "bert", logs["bert"]
    for name in ("base_base", "base_16k", "zero_base_128"):
        assert f"=== {name}: exit 0" in log, log[-4000:]
        records = json.loads((out / f"{name}.json").read_text())
        assert records and all(r["triplets_per_s"] > 0 for r in records), name
    # small_large at the tiny size would be base_base's run again: the GPU runs it, the smoke mode says it skips it.
    assert "=== small_large: skipped in smoke mode" in log and not (out / "small_large.json").exists()
    modes = {r["mode"] for r in json.loads((out / "zero_base_128.json").read_text())}
    assert modes == {"plain", "zero2", "zero3", "zero2_chunked", "zero3_chunked"}
    assert {r["mode"] for r in json.loads((out / "base_16k.json").read_text())} == {"grad_cache"}
    assert "=== mine: exit 0" in log, log[-4000:]
    mined = json.loads((out / "mine.json").read_text())
    assert mined["rows"] == 300 and mined["texts_per_s"] > 0 and mined["queries_per_s"] > 0

    out, log = tmp_path / "llm", logs["llm"]
    for name, lora_r in (("qwen3_06b", 0), ("qwen3_8b_lora", 16), ("qwen3_8b_lora_512", 16)):
        assert f"=== {name}: exit 0" in log, log[-4000:]
        records = json.loads((out / f"{name}.json").read_text())
        assert records and all(r["case"] == "qwen3-tiny/tiny" and r["lora_r"] == lora_r and r["triplets_per_s"] > 0
                               for r in records), name
    assert {r["mode"] for r in json.loads((out / "qwen3_8b_lora.json").read_text())} >= {"st", "grad_cache"}


def test_without_sentence_transformers_the_reference_is_skipped_with_a_message(tmp_path, monkeypatch, capsys):
    """A plain install (no `[dev]`) still benchmarks our modes; it says why there is no ratio."""
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # makes `import sentence_transformers` fail
    out = tmp_path / "plain.json"
    assert bench.main(["--cases", "tiny", "--batch", "4", "--modes", "st,plain", "--steps", "1", "--warmup", "1",
                       "--query-len", "4-8", "--doc-len", "8-16", "--out", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["mode"] for r in records] == ["plain"] and records[0]["ratio_vs_st"] is None
    assert records[0]["triplets_per_s"] > 0
    assert "sentence-transformers is not installed: the `st` reference is skipped" in capsys.readouterr().err


def test_built_in_deepspeed_settings_are_those_of_the_shipped_configs():
    """The bench carries its ZeRO configs in code (a pip install has no ds_configs/); they must not drift."""
    for stage in (2, 3):
        shipped = json.loads((REPO / "ds_configs" / f"zero{stage}.json").read_text())
        assert inputs.deepspeed_config(stage) == shipped, stage


def test_decoder_case_trains_the_same_model_as_sentence_transformers(tmp_path):
    """`--cases qwen3-tiny`: a Qwen3 student and guide with last-token pooling on EOS-terminated, EOS-padded
    batches; sentence-transformers and every mode of ours start from the same loss (dropout 0)."""
    out = tmp_path / "bench.json"
    args = [a if a != "tiny" else "qwen3-tiny" for a in TINY]
    assert cli.main(["bench", *args, "--modes", "st,plain,chunked,grad_cache", "--out", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["mode"] for r in records] == ["st", "plain", "chunked", "grad_cache"]
    for r in records:
        assert r["case"] == "qwen3-tiny/qwen3-tiny" and r["triplets_per_s"] > 0
        assert r["first_loss"] == pytest.approx(records[0]["first_loss"], abs=1e-4), r["mode"]
    batch = collated_student(tmp_path, "qwen3-tiny", 4, (3, 6), (7, 9))
    for features in batch.values():
        ids, mask = features["input_ids"], features["attention_mask"]
        assert (ids.gather(1, (mask.sum(1) - 1)[:, None]) == inputs.SEP).all() and (ids[mask == 0] == inputs.SEP).all()


def test_lora_modes_train_the_same_adapters_as_sentence_transformers_and_report_memory(tmp_path):
    """`--lora-r`: sentence-transformers (peft adapters injected into its model) and our modes, DeepSpeed's
    included, optimise the same adapter parameters from the same first loss; `--isolate` runs a mode in a process of
    its own and reports that process's peak memory on the CPU. ZeRO-3 runs in a fresh process (~8 s of imports) in
    any case, as the ZeRO modes do, so it is the one isolated; the reference and our other modes run here."""
    args = [a if a != "tiny" else "qwen3-tiny" for a in TINY]
    outs = {"here": tmp_path / "here.json", "isolated": tmp_path / "isolated.json"}
    assert cli.main(["bench", *args, "--modes", "st,plain,grad_cache", "--lora-r", "4", "--out",
                     str(outs["here"])]) == 0
    assert cli.main(["bench", *args, "--modes", "zero3", "--lora-r", "4", "--isolate",
                     "--out", str(outs["isolated"])]) == 0
    here, isolated = (json.loads(out.read_text()) for out in outs.values())
    assert [r["mode"] for r in here] == ["st", "plain", "grad_cache"]
    assert [r["mode"] for r in isolated] == ["zero3"]
    config = inputs.DECODER_SIZES["qwen3-tiny"]
    # r x (in + out) per adapted layer: q, k, v, o, gate, up, down in each of the layers.
    hidden, heads, kv, head_dim, mlp = (config[k] for k in ("hidden_size", "num_attention_heads",
                                                            "num_key_value_heads", "head_dim", "intermediate_size"))
    per_layer = 4 * ((hidden + heads * head_dim) * 2 + (hidden + kv * head_dim) * 2 + (hidden + mlp) * 3)
    for r in here + isolated:
        assert r["lora_r"] == 4 and r["trainable_params"] == config["num_hidden_layers"] * per_layer, r["mode"]
        assert r["first_loss"] == pytest.approx(here[0]["first_loss"], abs=1e-4), r["mode"]
    for r in isolated:
        assert r["peak_mem_kind"] == "process peak RSS over the steps" and 0.1 < r["peak_mem_gib"] < 8, r["mode"]
    assert all(r["peak_mem_gib"] is None for r in here)  # CPU, not isolated: no peak to report


def test_isolate_is_for_cpu_memory():
    with pytest.raises(SystemExit):
        bench.parse_args(["--isolate", "--device", "cuda"])


@pytest.mark.parametrize("model_type", ["bert", "qwen3"])
def test_forward_flops_count_the_matmuls_torch_counts(model_type):
    """`forward_flops` against torch's own FLOP counter on one unpadded text (grouped-query attention and a gated
    MLP for the decoder). Eager attention, whose matmuls the counter sees (it does not count CPU sdpa kernels)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig, AutoModel

    extra = {"num_key_value_heads": 1, "head_dim": 8} if model_type == "qwen3" else {}
    config = AutoConfig.for_model(model_type, vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=48, attn_implementation="eager", **extra)
    model = AutoModel.from_config(config).eval()
    length = 11
    ids = torch.randint(0, 100, (1, length))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    pooler = 2 * 32 * 32 if model_type == "bert" else 0  # BERT's pooler: one token through a dense layer
    assert forward_flops(config, length, length**2) == pytest.approx(counter.get_total_flops() - pooler, rel=0.01)
