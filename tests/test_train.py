"""End-to-end trainer tests: quickstart, export, resume, config errors, and parity across parallel layouts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dist_utils import assert_same_steps, loss_records, torchrun_command
from gist_scale.config import ModelConfig
from gist_scale.model import load_student, load_tokenizer
from gist_scale.train import main

METRIC_KEYS = {"step", "loss", "lr", "masked_fraction", "triplets_per_s", "tokens_per_s", "candidates_per_anchor",
               "duplicates_masked", "masked_fraction/qp", "masked_fraction/qn", "masked_fraction/qq",
               "masked_fraction/pp"}


def read_eval(run_dir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "eval/ndcg@10" in r}


def tiny_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--model.name", str(model_dir), "--guide.name", str(model_dir), "--train.log_every", "1",
            "--train.output_dir", str(out), *extra]


def test_quickstart_improves_retrieval_and_exports_a_sentence_transformers_model(tmp_path, capsys):
    """The no-argument quickstart (MiniLM guiding itself on the shipped WordNet sample), shortened to 8 steps."""
    from sentence_transformers import SentenceTransformer

    run = tmp_path / "quickstart"
    assert main(["--train.max_steps", "8", "--train.log_every", "1", "--train.output_dir", str(run)]) == 0

    records = loss_records(run)
    assert [r["step"] for r in records] == list(range(1, 9))
    for record in records:
        assert METRIC_KEYS <= record.keys()
        assert 0.0 <= record["masked_fraction"] <= 1.0 and record["loss"] > 0
        assert all(0.0 <= record[f"masked_fraction/{block}"] <= 1.0 for block in ("qp", "qn", "qq", "pp"))
    # The guide's judgement by block: the self-guide flags something somewhere over the run.
    assert any(record[f"masked_fraction/{block}"] > 0 for record in records for block in ("qp", "qn", "qq", "pp"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 8 and saved["model"]["pooling"] == "mean"

    # Held-out WordNet retrieval before (step 0) and after: fine-tuning must not make it worse.
    evals = read_eval(run)
    assert sorted(evals) == [0, 8]
    assert evals[8]["eval/ndcg@10"] >= evals[0]["eval/ndcg@10"]
    assert json.loads((run / "eval_baseline.json").read_text())["ndcg@10"] == evals[0]["eval/ndcg@10"]
    err = capsys.readouterr().err
    assert "before vs after GIST fine-tuning" in err and f"gist-scale report {run}" in err

    final = run / "final"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "modules.json", "1_Pooling/config.json",
                 "config_sentence_transformers.json", "2_Normalize"):
        assert (final / name).exists(), name
    texts = ["a large domesticated carnivore", "the act of moving quickly", "He ran to the station."]
    ours = load_student(ModelConfig(name=str(final))).eval()
    tokenizer = load_tokenizer(str(final))
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = ours(batch["input_ids"], batch["attention_mask"])
    st = SentenceTransformer(str(final), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(st, expected, atol=1e-5, rtol=1e-5)
    # The weights changed: the export is the trained model, not the starting point.
    base = load_student(ModelConfig()).eval()
    with torch.no_grad():
        assert not torch.allclose(base(batch["input_ids"], batch["attention_mask"]), expected, atol=1e-4)


def test_periodic_eval_keeps_the_best_model(tmp_path, tiny_model_dir):
    run = tmp_path / "best"
    eval_file = str(tmp_path / "eval.jsonl")
    from gist_scale.data import sample_data_path

    Path(eval_file).write_text("\n".join(sample_data_path("eval").read_text().splitlines()[:64]) + "\n")
    assert main(tiny_args(tiny_model_dir, run, "--train.batch_size", "8", "--train.max_steps", "4",
                          "--data.path", str(sample_data_path("train")), "--eval.path", eval_file,
                          "--eval.every", "2", "--checkpoint.keep_best", "ndcg@10")) == 0
    evals = read_eval(run)
    assert sorted(evals) == [0, 2, 4]
    best = json.loads((run / "best" / "best.json").read_text())
    assert best["metric"] == "ndcg@10"
    assert best["ndcg@10"] == max(evals[step]["eval/ndcg@10"] for step in (2, 4))
    assert (run / "best" / "model.safetensors").is_file() and (run / "best" / "modules.json").is_file()


def test_resume_continues_exactly(tmp_path, tiny_model_dir):
    """A run resumed from step 2 logs the same losses as the uninterrupted run (dropout on: RNG state restored)."""
    full = tmp_path / "full"
    assert main(tiny_args(tiny_model_dir, full, "--train.batch_size", "8", "--train.max_steps", "4",
                          "--checkpoint.every", "2", "--checkpoint.keep_last", "5")) == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step_2", resumed / "checkpoints" / "step_2")
    assert main(tiny_args(tiny_model_dir, resumed, "--train.batch_size", "8", "--train.max_steps", "4",
                          "--checkpoint.every", "2", "--resume", "auto")) == 0

    expected = {r["step"]: r["loss"] for r in loss_records(full)}
    got = {r["step"]: r["loss"] for r in loss_records(resumed)}
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], abs=1e-6)
    final_full = load_file(full / "final" / "model.safetensors")
    final_resumed = load_file(resumed / "final" / "model.safetensors")
    for name, tensor in final_full.items():
        torch.testing.assert_close(final_resumed[name], tensor, atol=1e-6, rtol=0)


def test_resume_auto_without_checkpoints_starts_fresh(tmp_path, tiny_model_dir):
    run = tmp_path / "fresh"
    assert main(tiny_args(tiny_model_dir, run, "--train.batch_size", "8", "--train.max_steps", "1",
                          "--resume", "auto")) == 0
    assert [r["step"] for r in loss_records(run)] == [1]


def test_debug_mode_runs_a_few_verbose_steps(tmp_path, tiny_model_dir, capsys):
    run = tmp_path / "debug"
    assert main(tiny_args(tiny_model_dir, run, "--train.batch_size", "8", "--debug")) == 0
    assert [r["step"] for r in loss_records(run)] == [1, 2, 3]
    assert "debug: step" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--optim.lrr", "1e-5"], "did you mean '--optim.lr'"),
    (["--loss.temperature", "0"], "loss.temperature=0.0: must be > 0"),
    (["--train.batch_size", "many"], "--train.batch_size='many': expected int"),
    (["--config", "/nonexistent.yaml"], "--config /nonexistent.yaml: no such file"),
])
def test_config_errors_are_clear(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_data_fails_before_training_naming_file_row_and_field(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"query": "q1", "pos": "p1", "neg": "n1", "task_name": "t"}\n'
                    '{"query": "q2", "pos": "", "neg": "n2", "task_name": "t"}\n')
    run = tmp_path / "run"
    assert main(["--data.path", str(data), "--train.output_dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "'pos'" in err
    assert not (run / "metrics.jsonl").exists()


# ---------------------------------------------------------------- parity across parallel layouts (multi-process)

LAYOUT_STEPS = 3


def _run_layout(layout: str | None, model_dir: Path, out: Path, launch_env, *extra: str) -> list[float]:
    """Train LAYOUT_STEPS steps of 8 triplets: in this process (layout None) or as 2 ranks x 4 under `layout`.

    The guide runs in fp32, the condition of the exactness contract: a bf16 guide's near-ties may flip with the
    padding of each rank's share (docs: "Exactness contract")."""
    per_device = 8 if layout is None else 4
    args = ["train", *tiny_args(model_dir, out, "--train.batch_size", str(per_device),
                                "--train.max_steps", str(LAYOUT_STEPS), "--model.dropout", "0.0",
                                "--guide.dtype", "fp32", *extra)]
    if layout is None:
        assert main(args[1:]) == 0
    else:
        result = subprocess.run(torchrun_command(2, *args), env=launch_env(layout), capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
    return [r["loss"] for r in loss_records(out)]


MATRYOSHKA = ("--loss.matryoshka_dims", "[32, 16, 8]", "--loss.matryoshka_weights", "[1.0, 0.5, 2.0]")


@pytest.mark.slow
@pytest.mark.parametrize(("layout", "extra"), [("ddp", ()), ("zero1", ()), ("zero2", ()), ("zero3", ()),
                                               ("zero3_offload", ()), ("ddp", MATRYOSHKA), ("zero3", MATRYOSHKA)],
                         ids=["ddp", "zero1", "zero2", "zero3", "zero3_offload", "ddp-matryoshka", "zero3-matryoshka"])
def test_two_ranks_match_one_process_with_the_whole_global_batch(layout, extra, tmp_path, tiny_model_dir, launch_env):
    """2 ranks x 4 triplets == 1 process x 8 triplets: the same loss, gradient norm and masks at every step, within
    1e-5, and the same final weights."""
    single = _run_layout(None, tiny_model_dir, tmp_path / "single", launch_env, *extra)
    multi = _run_layout(layout, tiny_model_dir, tmp_path / layout, launch_env, *extra)
    assert len(multi) == LAYOUT_STEPS
    assert_same_steps(tmp_path / layout, tmp_path / "single")
    reference = load_file(tmp_path / "single" / "final" / "model.safetensors")
    exported = load_file(tmp_path / layout / "final" / "model.safetensors")
    assert exported.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(exported[name].float(), tensor.float(), atol=1e-4, rtol=1e-4)


GUIDE_CHECK = textwrap.dedent("""
    import sys, torch
    from gist_scale.options import load_config
    from gist_scale.train import Trainer
    from gist_scale.trainer.optimizer import build_optimizer

    trainer = Trainer(load_config(sys.argv[1:]))
    assert trainer.plan.zero_stage == 3
    guide_params = list(trainer.guide.parameters())
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in guide_params)
    assert not any(hasattr(p, "ds_id") for p in guide_params), "guide was partitioned by ZeRO-3"
    assert all(p.numel() > 0 for p in guide_params)
    assert not trainer.guide.training
    student_params = list(trainer.student.parameters())
    assert all(hasattr(p, "ds_id") for p in student_params), "student is not partitioned"
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in guide_params}, "guide parameters reached the optimizer"
    # Weight decay on the partitioned (empty 1-D) weight matrices, by their real shape; none on biases and norms.
    student = trainer.accelerator.unwrap_model(trainer.student)
    decay, no_decay = build_optimizer(student, trainer.cfg.optim).param_groups
    assert decay["weight_decay"] == trainer.cfg.optim.weight_decay > 0 and no_decay["weight_decay"] == 0
    names = {id(p): n for n, p in student.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {
        n for n, p in student.named_parameters() if len(p.ds_shape) == 2 and "norm" not in n.lower()}
    assert "encoder.embeddings.word_embeddings.weight" in {names[id(p)] for p in decay["params"]}
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [trainer.cfg.optim.weight_decay, 0.0]
    print("GUIDE-OK", trainer.accelerator.process_index)
""")


@pytest.mark.slow
def test_guide_stays_bf16_frozen_and_unpartitioned_and_weights_decay_under_zero3(tmp_path, tiny_model_dir, launch_env):
    script = tmp_path / "check_guide.py"
    script.write_text(GUIDE_CHECK)
    command = torchrun_command(2, *tiny_args(tiny_model_dir, tmp_path / "run", "--train.batch_size", "4"))
    module = command.index("gist_scale")
    command[module - 1:module + 1] = [str(script)]  # run the check script instead of `-m gist_scale`
    result = subprocess.run(command, env=launch_env("zero3"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("GUIDE-OK") == 2


@pytest.mark.slow
@pytest.mark.parametrize(("layout", "precision"), [("zero2", "bf16"), ("zero3", "no")])
def test_deepspeed_skips_the_whole_step_of_a_nonfinite_loss(layout, precision, tmp_path, tiny_model_dir, launch_env):
    """Under DeepSpeed the update happens inside the last backward, before the step's decision: its own overflow
    check (switched on for bf16 by the trainer) must skip it, or the trainer stops with an error. The skipped step
    still counts, as with AMP's GradScaler: steps 1 and 3 log a loss, step 2 its skip."""
    from gist_scale.data import sample_data_path

    run = tmp_path / layout
    command = torchrun_command(1, "train", *tiny_args(tiny_model_dir, run, "--train.batch_size", "4",
                                                      "--train.max_steps", "3", "--train.grad_accum_steps", "2",
                                                      "--train.mixed_precision", precision,
                                                      "--data.path", str(sample_data_path("train"))))  # no eval
    env = dict(launch_env(layout), GIST_SCALE_FAULT="nonfinite_loss:2")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "non-finite loss: 1 step(s) skipped up to step 2 (1/5 in a row at most)" in result.stderr
    records = loss_records(run)
    assert [r["step"] for r in records] == [1, 3] and all(r["loss"] == r["loss"] for r in records)
    assert _skips(run) == {1: 0, 2: 1, 3: 0}
    weights = load_file(run / "final" / "model.safetensors")
    assert all(torch.isfinite(t.float()).all() for t in weights.values())


def _skips(run: Path) -> dict[int, int]:
    """`skipped_steps` of every training record, by step (a record of skipped steps only has no loss)."""
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["skipped_steps"] for r in records if "skipped_steps" in r}


def _loss_poisoned_on_calls(monkeypatch, poisoned: set[int]) -> None:
    """Make the loss NaN on the given (1-based) calls, as an fp16 overflow or a bad batch would."""
    from gist_scale.loss import GISTLoss

    original = GISTLoss.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        calls["n"] += 1
        loss, stats = original(self, *args, **kwargs)
        return (loss * float("nan") if calls["n"] in poisoned else loss), stats

    monkeypatch.setattr(GISTLoss, "forward", forward)


def test_a_nonfinite_step_is_skipped_and_training_goes_on(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """Step 2's loss is NaN: its update is skipped (the step still counts) and step 3 trains on."""
    _loss_poisoned_on_calls(monkeypatch, {2})
    run = tmp_path / "skip"
    assert main(tiny_args(tiny_model_dir, run, "--train.batch_size", "8", "--train.max_steps", "3")) == 0
    records = loss_records(run)
    assert [r["step"] for r in records] == [1, 3]
    assert all(r["loss"] == r["loss"] for r in records)  # no NaN reached the logged (or applied) steps
    assert _skips(run) == {1: 0, 2: 1, 3: 0}
    assert "non-finite loss: 1 step(s) skipped up to step 2 (1/5 in a row at most)" in capsys.readouterr().err


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """Steps 2 and 3 are non-finite, with at most 2 in a row: the run stops at the log step that reads the second."""
    _loss_poisoned_on_calls(monkeypatch, {2, 3})
    assert main(tiny_args(tiny_model_dir, tmp_path / "stop", "--train.batch_size", "8", "--train.max_steps", "3",
                          "--train.max_nonfinite_steps", "2")) == 1
    err = capsys.readouterr().err
    assert "error: 2 non-finite losses in a row" in err and "Traceback" not in err


def _parameters(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.student.named_parameters()}


def test_a_nonfinite_micro_batch_skips_its_whole_step_and_the_next_update_is_clean(tmp_path, tiny_model_dir,
                                                                                   monkeypatch):
    """With accumulation 2, a NaN in the step's last micro-batch must not leave the first micro-batch's gradients
    behind to be added into the next step: the step is skipped whole (it still counts, as with AMP's GradScaler),
    Adam's state is untouched, and the next update equals a clean one."""
    from gist_scale.options import load_config
    from gist_scale.train import Trainer

    def trainer(name: str) -> Trainer:
        # A constant learning rate: the skipped step advances the schedule, which a clean run's first step has not.
        return Trainer(load_config(tiny_args(tiny_model_dir, tmp_path / name, "--train.batch_size", "4",
                                             "--train.grad_accum_steps", "2", "--model.dropout", "0",
                                             "--optim.schedule", "constant", "--optim.warmup_ratio", "0")))

    monkeypatch.setenv("GIST_SCALE_FAULT", "nonfinite_loss:1")
    faulty = trainer("faulty")
    steps = faulty.optimizer_steps()
    first, second = next(steps), next(steps)
    start = _parameters(faulty)
    skipped = faulty.train_step(first)
    assert not skipped.applied and faulty.state.step == 1
    assert all(p.grad is None for p in faulty.student.parameters())
    assert all(torch.equal(p, start[name]) for name, p in _parameters(faulty).items())
    adam = list(faulty.optimizer.state.values())  # the skipped step: no Adam step counted, no moment moved
    assert all(s["step"].item() == 0 and not s["exp_avg"].any() and not s["exp_avg_sq"].any() for s in adam)
    assert faulty.nonfinite.read(faulty.state.step) == (1, 1)  # counted: 1 step skipped, 1 in a row
    assert faulty.train_step(second).applied and faulty.state.step == 2  # the fault poisons step 1 only
    monkeypatch.delenv("GIST_SCALE_FAULT")

    # The same weights, one clean step on the same micro-batches: the update must be identical (Adam's state
    # untouched by the skipped step).
    clean = trainer("clean")
    clean_steps = clean.optimizer_steps()
    next(clean_steps)
    assert all(torch.equal(p, start[name]) for name, p in _parameters(clean).items())
    assert clean.train_step(next(clean_steps)).applied
    after_clean, after_faulty = _parameters(clean), _parameters(faulty)
    assert any(not torch.equal(after_clean[name], start[name]) for name in start)
    for name, tensor in after_clean.items():
        torch.testing.assert_close(after_faulty[name], tensor, atol=1e-7, rtol=0)


DEVICE_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


def _read_by_our_code(frame) -> bool:
    """Does the read come from gist-scale's code or Accelerate's? torch's own frames in between are looked through
    (a torch function our code calls reads for it), except torch.optim's: AdamW keeps its step counts on the host by
    design."""
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith("torch.optim"):
            return False
        if not module.startswith("torch"):
            return module.split(".")[0] in ("gist_scale", "accelerate")
        frame = frame.f_back
    return False


def test_a_step_that_is_not_a_log_step_reads_nothing_back_from_the_device(tmp_path, tiny_model_dir, monkeypatch):
    """On one process, gist-scale and Accelerate read no tensor back to the host in a step that logs, checkpoints and
    evaluates nothing: the non-finite skip is decided on the device (the fused AdamW's `found_inf`), preemption is
    host state, and metrics wait for the log step. The device-read methods raise from the first step until the log of
    step 3 (`train.log_every 3`): steps 1 and 2 whole, and step 3 up to its log. (Before this rule every step read its
    decision back: `distributed.any_rank`'s `.tolist()` failed this test.)"""
    from gist_scale.data import sample_data_path
    from gist_scale.train import Trainer

    guard = {"on": False, "steps": 0, "logs": 0}
    for name in DEVICE_READS:
        def read(self, *args, _original=getattr(torch.Tensor, name), _name=name, **kwargs):
            if guard["on"] and _read_by_our_code(sys._getframe(1)):
                raise AssertionError(f"Tensor.{_name}() read back from the device inside a step")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    train_step, log = Trainer.train_step, Trainer._log

    def guarded_step(self, micro_batches):
        guard.update(on=True, steps=guard["steps"] + 1)
        return train_step(self, micro_batches)

    def log_step(self, window):
        guard.update(on=False, logs=guard["logs"] + 1)
        return log(self, window)

    monkeypatch.setattr(Trainer, "train_step", guarded_step)
    monkeypatch.setattr(Trainer, "_log", log_step)
    assert main(tiny_args(tiny_model_dir, tmp_path / "run", "--train.batch_size", "4", "--train.max_steps", "3",
                          "--train.log_every", "3", "--data.path", str(sample_data_path("train")))) == 0
    assert guard == {"on": False, "steps": 3, "logs": 1}


def test_running_out_of_memory_in_a_step_ends_with_one_error_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from gist_scale.data import sample_data_path
    from gist_scale.loss import GISTLoss

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(GISTLoss, "forward", out_of_memory)
    assert main(tiny_args(tiny_model_dir, tmp_path / "run", "--train.batch_size", "4", "--train.max_steps", "1",
                          "--data.path", str(sample_data_path("train")))) == 1
    err = capsys.readouterr().err
    assert "error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB): lower --train.batch_size" in err
    assert "Traceback" not in err


SLOW_EVAL_S = 1000.0
"""How long the patched evaluation takes on the trainer's clock: far longer than two tiny training steps, however
loaded the machine."""


def test_throughput_is_timed_over_training_steps_only(tmp_path, tiny_model_dir, monkeypatch):
    """The first log window used to start before the baseline evaluation: a slow evaluation must not lower the
    logged throughput, and evaluation time is logged on its own. The evaluation moves the trainer's clock forward
    instead of sleeping, so a loaded machine can neither fail the test nor slow it down."""
    import time
    from types import SimpleNamespace

    from gist_scale.data import sample_data_path
    from gist_scale.trainer import evaluator, step_metrics

    skipped = [0.0]
    monkeypatch.setattr(step_metrics, "time", SimpleNamespace(perf_counter=lambda: time.perf_counter() + skipped[0]))
    original = evaluator.evaluate_embedder
    calls = []

    def slow_evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:  # the baseline (before the first window) and the one at step 2 (in the second)
            skipped[0] += SLOW_EVAL_S
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluator, "evaluate_embedder", slow_evaluate)
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("\n".join(sample_data_path("eval").read_text().splitlines()[:16]) + "\n")
    run = tmp_path / "timed"
    assert main(tiny_args(tiny_model_dir, run, "--train.batch_size", "8", "--train.max_steps", "4",
                          "--train.log_every", "2", "--data.path", str(sample_data_path("train")),
                          "--eval.path", str(eval_file), "--eval.every", "2")) == 0
    assert len(calls) == 3  # the baseline, step 2 and step 4
    first, second = loss_records(run)
    for record in (first, second):
        seconds = 2 * 8 / record["triplets_per_s"]  # two steps of 8 triplets
        assert seconds < SLOW_EVAL_S, record  # the evaluations' time is not in it
    assert "eval_seconds" not in first  # the baseline evaluation came before any training step
    assert second["eval_seconds"] >= SLOW_EVAL_S  # the evaluation at step 2 ran inside the second window


def test_gradient_accumulation_logs_the_candidates_each_anchor_really_sees(tmp_path, tiny_model_dir):
    """Accumulation grows the batch per optimizer step but not the negatives: the log says so."""
    run = tmp_path / "accum"
    assert main(tiny_args(tiny_model_dir, run, "--train.batch_size", "4", "--train.grad_accum_steps", "2",
                          "--train.max_steps", "2")) == 0
    records = loss_records(run)
    assert [r["step"] for r in records] == [1, 2]
    # One micro-batch of 4 triplets: 4 positives + 4 negatives + 3 other queries + 3 other positives.
    assert all(r["candidates_per_anchor"] == 14 for r in records)


def test_logged_model_flops_and_mfu_with_collator_planned_chunks(tmp_path, tiny_model_dir, capsys):
    """Chunked training (the collator plans the chunks) logs model FLOP/s on real tokens and MFU against the peak."""
    from transformers import AutoConfig

    run = tmp_path / "mfu"
    assert main(tiny_args(tiny_model_dir, run, "--train.batch_size", "8", "--train.max_steps", "2",
                          "--train.chunk_size", "10", "--logging.peak_tflops", "0.001", "--debug")) == 0
    records = loss_records(run)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    h, layers = config.hidden_size, config.num_hidden_layers
    linear = layers * (4 * h * h + 2 * h * config.intermediate_size)
    for record in records:
        assert record["mfu"] == pytest.approx(record["model_tflops_per_s"] / 0.001)
        # Per real token, a forward costs 2 x linear plus attention's 4 x layers x h x (length-weighted mean length);
        # the student counts 3 forwards (forward and backward), the live guide 1.
        per_token = record["model_tflops_per_s"] * 1e12 / record["tokens_per_s"]
        assert 8 * linear + 16 * layers * h * 2 < per_token < 8 * linear + 16 * layers * h * 128
    assert "MFU" in capsys.readouterr().err


def test_debug_mode_refuses_several_processes(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--debug"]) == 2
    assert "--debug runs a single process" in capsys.readouterr().err


WORDS = ["amber", "birch", "cedar", "delta", "ember", "fjord", "grove", "harbor"]


@pytest.mark.parametrize("path", ["prepared", "streaming", "guide cache", "grad cache"])
def test_a_negative_that_is_another_rows_positive_is_masked_by_identity(tmp_path, tiny_model_dir, path):
    """Row i's negative is row i+1's positive: in a global batch of all 8 rows, every row meets its own positive's
    text once among the negatives, so 8 duplicates are masked per step, on every data path; the option off, none."""
    rows = [{"query": f"what is {w}", "pos": f"{w} is a word", "neg": f"{WORDS[(i + 1) % 8]} is a word",
             "task_name": "t"} for i, w in enumerate(WORDS)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = ["--data.path", str(data), "--data.neg_columns", "[neg]", "--train.batch_size", "8",
             "--train.max_steps", "2", "--eval.path", "null"]
    if path == "streaming":
        extra += ["--data.streaming", "true"]
    elif path == "grad cache":
        extra += ["--train.grad_cache", "true", "--train.chunk_size", "5"]
    elif path == "guide cache":
        from gist_scale.guide_cache import main as cache_main

        assert cache_main([str(tmp_path / "cache"), "--guide.name", str(tiny_model_dir), "--data.path", str(data),
                           "--data.neg_columns", "[neg]"]) == 0
        extra += ["--guide.cache", str(tmp_path / "cache")]
    for mask, expected in (("true", 8.0), ("false", 0.0)):
        run = tmp_path / f"run-{mask}"
        assert main(tiny_args(tiny_model_dir, run, *extra, "--loss.mask_duplicates", mask)) == 0
        assert [r["duplicates_masked"] for r in loss_records(run)] == [expected, expected]
