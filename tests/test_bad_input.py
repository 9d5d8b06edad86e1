"""Bad input, tried as a new user would, through the real `main` of `train`, `eval` and `cache-guide`.

Every case must end with exit code 2 and one `error:` line that names the problem (the option, file, line or
place) and the fix; no traceback; and every file that existed before the command unchanged, byte for byte, with an
earlier run's directory among them. The checks fire before any model weights load, so the module stays fast.
A failed checkpoint save (the disk fills up) is tested separately, on a real run.
"""

from __future__ import annotations

import errno
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import datasets
import huggingface_hub
import pytest
import torch

from gist_scale import guide_cache, train
from gist_scale.evaluation import cli as eval_cli
from gist_scale.checkpoint import COMPLETE_MARKER, complete_checkpoints

datasets.disable_progress_bars()

MAINS = {"train": train.main, "eval": eval_cli.main, "cache-guide": guide_cache.main}
ROWS = [{"query": f"query {i}", "pos": f"positive {i}", "neg": f"negative {i}", "task_name": "t"} for i in range(16)]


def _write(name: str, content: str | bytes) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def _mkdir(name: str) -> Callable[[Path], None]:
    return lambda root: (root / name).mkdir(parents=True)


def _tracker_not_installed() -> str:
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    installed = {t.value for t in get_available_trackers()}
    return next(t.value for t in LoggerType if t.value not in installed | {"all"})


def _unwritable_dir() -> str:
    """A directory nobody may create, root included: /sys is a read-only kernel file system."""
    return "/sys/gist-scale-bad-input-test"


TRAIN = ["--model.name", "{model}", "--guide.name", "{model}", "--data.path", "{data}", "--train.output_dir", "{run}",
         "--train.batch_size", "2", "--train.max_steps", "1"]
JSONL_ROWS = "".join(json.dumps(row) + "\n" for row in ROWS)
LONG_ROWS = "".join(json.dumps({**row, "query": "word " * 300}) + "\n" for row in ROWS)

# (id, command, arguments, setup, expected part of the error line)
CASES = [
    # ---- config values: finite numbers, ranges, element types, YAML syntax
    ("infinite batch size", "train", TRAIN + ["--train.batch_size", "inf"], None,
     "--train.batch_size='inf': expected int"),
    ("NaN margin", "train", TRAIN + ["--loss.margin", "nan"], None, "--loss.margin='nan': expected float"),
    ("infinite temperature", "train", TRAIN + ["--loss.temperature", ".inf"], None,
     "loss.temperature=inf: must be a finite number"),
    ("infinite learning rate", "train", TRAIN + ["--optim.lr", "inf"], None, "--optim.lr='inf': expected float"),
    ("negative learning rate", "train", TRAIN + ["--optim.lr", "-1e-5"], None, "optim.lr=-1e-05: must be > 0"),
    ("negative epsilon", "train", TRAIN + ["--optim.eps", "-1e-8"], None, "optim.eps=-1e-08: must be > 0"),
    ("negative seed", "train", TRAIN + ["--train.seed", "-1"], None, "train.seed=-1: must be in [0, 2**32)"),
    ("seed too large", "train", TRAIN + ["--train.seed", "4294967296"], None, "must be in [0, 2**32)"),
    ("seed not whole", "train", TRAIN + ["--train.seed", "1e20"], None, "--train.seed='1e+20': expected int"),
    ("non-numeric betas", "train", TRAIN + ["--optim.betas", "[a, b]"], None, "--optim.betas='a': expected float"),
    ("betas out of range", "train", TRAIN + ["--optim.betas", "[0.9, 1.5]"], None,
     "optim.betas=[0.9, 1.5]: two values in [0, 1)"),
    ("one beta", "train", TRAIN + ["--optim.betas", "[0.9]"], None, "--optim.betas='[0.9]': expected a list of 2 values"),
    ("unclosed list", "train", TRAIN + ["--optim.betas", "[0.9"], None, "--optim.betas='[0.9': expected a YAML list"),
    ("negative weight decay", "train", TRAIN + ["--optim.weight_decay", "-0.1"], None,
     "optim.weight_decay=-0.1: must be >= 0"),
    ("NaN dropout", "train", TRAIN + ["--model.dropout", "nan"], None, "--model.dropout='nan': expected float or null"),
    ("infinite max length", "train", TRAIN + ["--model.max_length", "inf"], None, "--model.max_length='inf': expected int"),
    ("fractional batch size", "train", TRAIN + ["--train.batch_size", "2.5"], None, "expected int"),
    ("list of lists as columns", "train", TRAIN + ["--data.neg_columns", "[[a]]"], None,
     "--data.neg_columns=\"['a']\": expected str"),
    ("unknown tracker", "train", TRAIN + ["--logging.trackers", "[tensorbord]"], None,
     "logging.trackers: unknown tracker 'tensorbord'"),
    ("tracker not installed", "train", TRAIN + ["--logging.trackers", f"[{_tracker_not_installed()}]"], None,
     "is not installed here; `pip install"),
    ("empty output dir", "train", TRAIN + ["--train.output_dir", ""], None, "train.output_dir='': must not be empty"),
    ("empty data path", "train", TRAIN + ["--data.path", ""], None, "data.path='': must not be empty (null unsets"),
    ("empty resume", "train", TRAIN + ["--resume", ""], None, "resume='': must not be empty"),
    ("keep_best not a metric", "train", TRAIN + ["--checkpoint.keep_best", "ndcg", "--eval.path", "{data}"], None,
     "checkpoint.keep_best='ndcg': not an eval metric; use one of ndcg@10"),
    ("unknown precision", "train", TRAIN + ["--train.mixed_precision", "fp8"], None,
     "--train.mixed_precision='fp8': expected one of no, bf16, fp16"),
    ("YAML syntax error", "train", TRAIN + ["--config", "{root}/bad.yaml"],
     _write("bad.yaml", "train:\n  batch_size: 2\n  max_steps: [1,\n"), "bad.yaml, line 4, column 1: YAML syntax"),
    ("YAML tab indentation", "train", TRAIN + ["--config", "{root}/bad.yaml"],
     _write("bad.yaml", "train:\n\tbatch_size: 2\n"), "bad.yaml, line 2, column 1: YAML syntax error"),
    ("YAML not UTF-8", "train", TRAIN + ["--config", "{root}/bad.yaml"],
     _write("bad.yaml", b"train:\n  output_dir: caf\xe9\n"), "bad.yaml: not UTF-8 text (line 2, column 18"),
    ("YAML infinite batch", "train", TRAIN + ["--config", "{root}/bad.yaml"],
     _write("bad.yaml", "train:\n  batch_size: .inf\n"), "bad.yaml: train.batch_size='inf': expected int"),
    ("YAML mapping for a list", "train", TRAIN + ["--config", "{root}/bad.yaml"],
     _write("bad.yaml", "data:\n  neg_columns: {a: 1}\n"), "bad.yaml: data.neg_columns=\"{{'a': 1}}\": expected a YAML list"),
    ("YAML debug not a bool", "train", TRAIN + ["--config", "{root}/bad.yaml"], _write("bad.yaml", "debug: maybe\n"),
     "bad.yaml: debug='maybe': expected bool"),
    ("YAML no as a boolean", "train", TRAIN + ["--config", "{root}/bad.yaml"],
     _write("bad.yaml", "train:\n  mixed_precision: no\n"), "YAML reads no/yes/on/off as booleans: quote the name"),
    ("YAML key not a name", "train", ["--config", "{root}/bad.yaml"], _write("bad.yaml", "train:\n  1: 2\n"),
     "{root}/bad.yaml: Key must be a string, got: 1"),
    ("misspelt section", "train", TRAIN + ["--modle.name", "x"], None,
     "unknown option '--modle.name'; did you mean '--model.name'?"),
    ("infinite timeout", "train", TRAIN + ["--train.collective_timeout_s", ".inf"], None, "expected int"),
    ("fractional chunk size", "train", TRAIN + ["--train.chunk_size", "1.5"], None,
     "--train.chunk_size='1.5': expected int or null"),
    ("empty column name", "train", TRAIN + ["--data.query_column", ""], None, "data.query_column='': must not be"),
    ("empty negative column", "train", TRAIN + ["--data.neg_columns", "['', neg]"], None,
     "data.neg_columns=('', 'neg'): must not be empty"),
    ("eval --config a directory", "eval", ["{model}", "--config", "{root}"], None,
     "--config {root}: is a directory; give the YAML file"),
    ("cache-guide YAML syntax error", "cache-guide", ["{root}/c", "--config", "{root}/bad.yaml"],
     _write("bad.yaml", "guide: [\n"), "bad.yaml, line 2, column 1: YAML syntax error"),
    ("cache-guide misspelt option", "cache-guide", ["{root}/c", "--guide.nmae", "x"], None,
     "unknown option '--guide.nmae'; did you mean '--guide.name'?"),
    ("config is a directory", "train", ["--config", "{root}"], None, "is a directory; give the YAML file"),
    # ---- data.streaming: what a stream of unknown length cannot do
    ("streaming without max_steps", "train", TRAIN + ["--data.streaming", "true", "--train.max_steps", "null"], None,
     "data.streaming=true needs train.max_steps: a stream's length is unknown until it is read"),
    ("streaming with workers", "train", TRAIN + ["--data.streaming", "true", "--data.num_workers", "2"], None,
     "data.streaming=true needs data.num_workers=0 (got 2)"),
    ("streaming with a guide cache", "train", TRAIN + ["--data.streaming", "true", "--guide.cache", "{root}"], None,
     "data.streaming=true cannot use guide.cache (the cache indexes the rows of a prepared dataset)"),
    ("streaming unweighted sources", "train",
     TRAIN + ["--data.streaming", "true", "--data.sources", "[{{path: {data}}}, {{path: {data}, name: again}}]"], None,
     "data.streaming=true with several data.sources needs a weight on every source: a stream's size is unknown"),
    # ---- places: output directories that cannot be written, checkpoints and caches that are not there
    ("output dir is a file", "train", TRAIN + ["--train.output_dir", "{root}/file"], _write("file", "x"),
     "train.output_dir: {root}/file is a file, so {root}/file/checkpoints cannot be created"),
    ("output dir under a file", "train", TRAIN + ["--train.output_dir", "{root}/file/run"], _write("file", "x"),
     "{root}/file is a file, so"),
    ("output dir not writable", "train", TRAIN + ["--train.output_dir", _unwritable_dir()], None,
     f"train.output_dir: cannot write in {_unwritable_dir()}"),
    ("checkpoints is a file", "train", TRAIN + ["--train.output_dir", "{root}/run2", "--resume", "auto"],
     _write("run2/checkpoints", "x"), "{root}/run2/checkpoints is a file, not a directory"),
    ("resume a file", "train", TRAIN + ["--resume", "{data}"], None, "is not a complete checkpoint"),
    ("resume with a file turned into a folder", "train", TRAIN + ["--resume", "{root}/ckpt"],
     lambda root: ((root / "ckpt" / "optimizer.bin").mkdir(parents=True),
                   (root / "ckpt" / COMPLETE_MARKER).write_text('{"step": 1, "files": {"optimizer.bin": 3}}')),
     "ckpt/optimizer.bin: listed in {root}/ckpt/complete.json but missing"),
    ("resume a damaged marker", "train", TRAIN + ["--resume", "{root}/ckpt"], _write(f"ckpt/{COMPLETE_MARKER}", "{"),
     "unreadable completion marker"),
    ("guide cache is a file", "train", TRAIN + ["--guide.cache", "{data}"], None,
     "guide.cache={data}: no such directory; build it"),
    ("guide cache is empty", "train", TRAIN + ["--guide.cache", "{root}/cache"], _mkdir("cache"),
     "no gist_guide_cache.json"),
    ("eval --out is a directory", "eval", ["{model}", "--data", "{data}", "--out", "{root}"], None,
     "--out: {root} is a directory; give a file name"),
    ("eval --out under a file", "eval", ["{model}", "--data", "{data}", "--out", "{root}/file/m.json"],
     _write("file", "x"), "--out: {root}/file is a file, not a directory"),
    ("cache-guide into a file", "cache-guide", ["{data}", "--data.path", "{data}", "--guide.name", "{model}"], None,
     "cache-guide OUT_DIR: {data} is a file, not a directory"),
    ("cache-guide zero rows per batch", "cache-guide", ["{root}/c", "--rows-per-batch", "0"], None,
     "--rows-per-batch and --chunk-size must be positive"),
    # ---- models: typos, offline hub names, folders that are not models, limits of the model
    ("student path typo", "train", TRAIN + ["--model.name", "{root}/minilm-typo"], None,
     "model {root}/minilm-typo: no such model directory"),
    ("guide path typo", "train", TRAIN + ["--guide.name", "./no/such/guide"], None,
     "model ./no/such/guide: no such model directory"),
    ("hub name offline", "train", TRAIN + ["--model.name", "no-such-org/no-such-model"], None,
     "model no-such-org/no-such-model: not a local directory"),
    ("model is a file", "train", TRAIN + ["--model.name", "{data}"], None, "is a file, not a model directory"),
    ("model folder without config", "train", TRAIN + ["--model.name", "{root}/empty"], _mkdir("empty"),
     "is not a model directory (it has no config.json)"),
    ("unknown attention", "train", TRAIN + ["--model.attn_implementation", "fast"], None,
     'attn_implementation="fast"` is not supported'),
    ("max length beyond positions", "train", TRAIN + ["--model.max_length", "1024", "--data.path", "{root}/long.jsonl"],
     _write("long.jsonl", LONG_ROWS), "model.max_length=1024: {model} has 128 positions"),
    ("eval a folder that is not a model", "eval", ["{root}/empty", "--data", "{data}"], _mkdir("empty"),
     "not a model directory: it has neither modules.json"),
    ("eval a hub name offline", "eval", ["no-such-org/no-such-model", "--data", "{data}"], None,
     "the hub is switched off (HF_HUB_OFFLINE=1)"),
    ("eval a missing baseline", "eval", ["{model}", "--data", "{data}", "--baseline", "{root}/nope"], None,
     "model {root}/nope: no such model directory"),
    ("eval on a bogus device", "eval", ["{model}", "--data", "{data}", "--device", "gpu0"], None,
     "--device gpu0: not a torch device"),
    ("eval on a missing device", "eval", ["{model}", "--data", "{data}", "--device", "cuda:99"], None,
     "--device cuda:99: no such device on this machine"),
    ("cache-guide guide typo", "cache-guide", ["{root}/c", "--data.path", "{data}", "--guide.name", "{root}/typo"],
     None, "model {root}/typo: no such model directory"),
    # ---- data: empty, not UTF-8, unreadable, in every format and every place data is read
    ("empty JSONL", "train", TRAIN + ["--data.path", "{root}/e.jsonl"], _write("e.jsonl", ""),
     "{root}/e.jsonl: cannot read as JSON lines: empty file; give a file with rows"),
    ("JSONL not UTF-8", "train", TRAIN + ["--data.path", "{root}/e.jsonl"],
     _write("e.jsonl", JSONL_ROWS.encode() + b'{"query": "caf\xe9"}\n'),
     "{root}/e.jsonl: cannot read as JSON lines: not UTF-8 text (line 17, column 15"),
    ("JSONL in UTF-16", "train", TRAIN + ["--data.path", "{root}/e.jsonl"],
     _write("e.jsonl", JSONL_ROWS.encode("utf-16")), "not UTF-8 text (line 1, column 1: byte 0xff)"),
    ("empty CSV", "train", TRAIN + ["--data.path", "{root}/e.csv"], _write("e.csv", ""),
     "e.csv: cannot read as csv: empty file"),
    ("CSV not UTF-8", "train", TRAIN + ["--data.path", "{root}/e.csv"],
     _write("e.csv", b"query,pos,neg,task_name\nq,p,\xff,t\n"),
     "e.csv: cannot read as csv: not UTF-8 text (line 2, column 5"),
    ("CSV header only", "train", TRAIN + ["--data.path", "{root}/e.csv"], _write("e.csv", "query,pos,neg,task_name\n"),
     "a header but no rows"),
    ("CSV ragged line", "train", TRAIN + ["--data.path", "{root}/e.csv"],
     _write("e.csv", "query,pos,neg,task_name\nq,p,n,t\nq,p,n,t,x,y\n"), "Expected 4 fields in line 3, saw 6"),
    ("empty JSON", "train", TRAIN + ["--data.path", "{root}/e.json"], _write("e.json", ""),
     "e.json: cannot read as JSON lines: empty file"),
    ("JSON not UTF-8", "train", TRAIN + ["--data.path", "{root}/e.json"], _write("e.json", b'[{"query": "\xff"}]'),
     "e.json: cannot read as json: not UTF-8 text (line 1, column 13"),
    ("empty Parquet", "train", TRAIN + ["--data.path", "{root}/e.parquet"], _write("e.parquet", b""),
     "e.parquet: cannot read as parquet: Parquet file size is 0 bytes"),
    ("Parquet of garbage", "train", TRAIN + ["--data.path", "{root}/e.parquet"], _write("e.parquet", b"\xffgarbage"),
     "e.parquet: cannot read as parquet: Parquet magic bytes not found"),
    ("data is a device", "train", TRAIN + ["--data.path", "/dev/null"], None, "--data.path /dev/null: no such file"),
    ("only blank lines", "train", TRAIN + ["--data.path", "{root}/e.jsonl"], _write("e.jsonl", "\n\n\n"),
     "e.jsonl: no rows"),
    # ---- data: several positives per row, task filters
    ("empty list of positives", "train", TRAIN + ["--data.num_positives", "2", "--data.path", "{root}/p.jsonl"],
     _write("p.jsonl", JSONL_ROWS + json.dumps({**ROWS[0], "pos": []}) + "\n"),
     "{root}/p.jsonl:17: field 'pos': empty list of positives (1 bad row in {root}/p.jsonl"),
    ("a positive not text", "train", TRAIN + ["--data.num_positives", "2", "--data.path", "{root}/p.jsonl"],
     _write("p.jsonl", json.dumps({**ROWS[0], "pos": ["one", 7]}) + "\n" + JSONL_ROWS),
     "{root}/p.jsonl:1: field 'pos': expected text, got int"),
    ("no positive per row", "train", TRAIN + ["--data.num_positives", "0"], None,
     "data.num_positives=0: must be >= 1"),
    ("task both included and excluded", "train", TRAIN + ["--data.include_tasks", "[t]", "--data.exclude_tasks", "[t]"],
     None, "data: t both included and excluded"),
    ("task filter leaves no rows", "train", TRAIN + ["--data.include_tasks", "[mteb_*]"], None,
     "{data}: the task filter left no rows: include_tasks ['mteb_*'] left out 16 rows of 1 task (t); widen"),
    ("source task filter leaves no rows", "train",
     TRAIN + ["--data.path", "null", "--data.sources",
              "[{{path: {data}, task_column: task_name, exclude_tasks: [t]}}]"],
     None, "data.sources 'data': {data}: the task filter left no rows: exclude_tasks ['t'] left out 16 rows of 1 task"),
    ("empty eval file", "train", TRAIN + ["--eval.path", "{root}/e.jsonl"], _write("e.jsonl", ""),
     "e.jsonl: cannot read as JSON lines: empty file"),
    ("eval corpus not UTF-8", "train", TRAIN + ["--eval.path", "{data}", "--eval.corpus", "[{root}/c.txt]"],
     _write("c.txt", b"one\ntwo\nthr\xe9e\n"), "--corpus {root}/c.txt: cannot read as text: not UTF-8 text (line 3"),
    ("eval --data empty", "eval", ["{model}", "--data", "{root}/e.jsonl"], _write("e.jsonl", ""),
     "e.jsonl: cannot read as JSON lines: empty file"),
    ("eval --corpus empty", "eval", ["{model}", "--data", "{data}", "--corpus", "{root}/c.jsonl"],
     _write("c.jsonl", ""), "--corpus {root}/c.jsonl: cannot read as json: empty file"),
    ("eval --sts not UTF-8", "eval", ["{model}", "--data", "{data}", "--sts", "{root}/s.jsonl"],
     _write("s.jsonl", b'{"sentence1": "\xe9", "sentence2": "b", "score": 1}\n'),
     "--sts {root}/s.jsonl: cannot read as json: not UTF-8 text (line 1, column 16"),
    ("eval --sts missing", "eval", ["{model}", "--data", "{data}", "--sts", "{root}/nope.jsonl"], None,
     "--sts {root}/nope.jsonl: no such file"),
    ("cache-guide data not UTF-8", "cache-guide", ["{root}/c", "--data.path", "{root}/e.jsonl", "--guide.name",
                                                   "{model}"], _write("e.jsonl", b"\xff\n"), "not UTF-8 text (line 1"),
]


def _hashes(root: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def places(tmp_path: Path, tiny_model_dir: Path) -> dict[str, str]:
    """Good data, and an earlier run's directory (config, metrics, a checkpoint) that bad input must not touch."""
    (tmp_path / "data.jsonl").write_text(JSONL_ROWS)
    run = tmp_path / "run"
    (run / "checkpoints" / "step_1").mkdir(parents=True)
    (run / "config.yaml").write_text("train:\n  batch_size: 2\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (run / "checkpoints" / "step_1" / COMPLETE_MARKER).write_text('{"step": 1, "files": {}}')
    return {"root": str(tmp_path), "model": str(tiny_model_dir), "data": str(tmp_path / "data.jsonl"),
            "run": str(run)}


@pytest.mark.parametrize(("command", "args", "setup", "message"),
                         [pytest.param(*case[1:], id=case[0]) for case in CASES])
def test_bad_input_is_one_line_exit_2_and_harms_nothing(command, args, setup, message, places, tiny_model_dir,
                                                        monkeypatch, capsys):
    # Hub names must fail at once, not after retries: the hub is switched off as HF_HUB_OFFLINE=1 would.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    root = Path(places["root"])
    if setup is not None:
        setup(root)
    before = _hashes(root)

    code = MAINS[command]([arg.format(**places) for arg in args])

    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2, err
    assert len(errors) == 1, err
    assert message.format(**places) in errors[0], err
    assert "Traceback" not in err
    assert {p: h for p, h in _hashes(root).items() if p in before} == before


def test_a_full_disk_during_a_checkpoint_save_keeps_the_previous_one(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """The disk fills up while step 2 is being saved: the save fails with one clear line and exit code 2, step 1
    stays the newest complete checkpoint, byte for byte, and nothing half-written is left in checkpoints/."""
    data = tmp_path / "data.jsonl"
    data.write_text(JSONL_ROWS)
    run = tmp_path / "run"
    args = [arg.format(model=tiny_model_dir, data=data, run=run) for arg in TRAIN] + [
        "--checkpoint.every", "1", "--model.dropout", "0.0", "--train.log_every", "1"]
    assert train.main(args) == 0
    checkpoints = run / "checkpoints"
    assert complete_checkpoints(checkpoints) == [checkpoints / "step_1"]
    before = _hashes(checkpoints)

    real_save = torch.save

    def disk_full(obj, f, *rest, **kwargs):
        # Half of the file reaches the disk, then there is no room for the rest.
        real_save(obj, f, *rest, **kwargs)
        Path(f).write_bytes(Path(f).read_bytes()[: Path(f).stat().st_size // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", disk_full)
    capsys.readouterr()
    assert train.main(args + ["--train.max_steps", "2", "--resume", "auto"]) == 2

    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "saving checkpoint step_2" in errors[0] and "No space left on device" in errors[0], err
    assert f"the newest complete checkpoint is still {checkpoints / 'step_1'}" in errors[0], err
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_1"]
    assert _hashes(checkpoints) == before
    assert complete_checkpoints(checkpoints) == [checkpoints / "step_1"]


def test_a_choice_named_like_a_yaml_boolean_is_taken_from_the_command_line():
    """`--train.mixed_precision no` is the documented default, though YAML would read `no` as false."""
    from gist_scale.options import load_config

    assert load_config(["--train.mixed_precision", "no"]).train.mixed_precision == "no"


def test_a_byte_order_mark_before_the_first_json_line_is_not_an_error(tmp_path):
    """Some Windows editors start UTF-8 files with a byte-order mark; it is not part of the first row."""
    from gist_scale.config import DataConfig
    from gist_scale.data import load_triplets

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + JSONL_ROWS.encode())
    dataset, report = load_triplets(DataConfig(path=str(path)))
    assert report.rows == len(ROWS) and dataset[0]["query"] == ROWS[0]["query"]
