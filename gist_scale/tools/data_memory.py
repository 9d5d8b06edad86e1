"""Peak memory and time of the data path alone (no model): load + validate, tokenize, build the sampler, one epoch
of collated batches, on N synthetic rows.

    python -m gist_scale.tools.data_memory --rows 1000000 [--batch-size 128] [--work-dir DIR] [--no-tokenize]
    python -m gist_scale.tools.data_memory --rows 1000000 --streaming

Run it once per size, each in a fresh process, so that one size's peak does not hide in another's. The rows are
written as JSONL into `--work-dir` (default: a temporary folder, deleted afterwards) and `datasets`' cache goes
there too, so a measurement always includes the one-time cache writes. Both tokenizations (student and guide) use
the all-MiniLM-L6-v2 tokenizer, as the quickstart does. Prints one JSON object: per phase, wall-clock and CPU seconds
(on a shared machine the CPU time is the comparable one), CPU microseconds per row, and the peak resident memory
split into anonymous memory (what the process itself holds) and file-backed pages (the memory-mapped Arrow files the
kernel has paged in: reclaimable page cache, not an allocation). `--no-tokenize` measures only loading, validation,
the sampler and one epoch's plan of row indices (the parts that once held a Python string per row), for sizes whose
tokenization would take too long here. `--streaming` measures `data.streaming` instead: the file read through
`datasets` streaming, validated, buffered per task, tokenized and collated, for as many global batches as the rows
make, plus the size of the stream's checkpoint state (JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import tempfile
import threading
import time
from itertools import islice
from pathlib import Path

import datasets
import numpy as np

from gist_scale.config import DataConfig
from gist_scale.data import (StreamingBatches, TripletCollator, build_dataloader, build_sampler, count_tokens,
                             load_triplets, tokenize_triplets)
from gist_scale.model import load_tokenizer

WORDS = ("the of and to in is was for on that with as by at from his her an which are be this had not but were "
         "one all their have has its also first new after who two more other into time only over such may three "
         "state most used where some these would world than city called made between during later under while "
         "known being both many however part well year years since before through against system number").split()


def write_rows(path: Path, rows: int, tasks: int = 8) -> None:
    """`rows` triplets as JSONL (query 6 words and a number, positive 16 words, negative 16 words), streamed to disk
    (never all in memory)."""
    rng = np.random.default_rng(0)
    words = np.array(WORDS)
    with path.open("w") as handle:
        for start in range(0, rows, 10_000):
            count = min(10_000, rows - start)
            picks = words[rng.integers(0, len(words), size=(count, 38))]
            for i, row in enumerate(range(start, start + count)):
                handle.write(json.dumps({
                    "query": f"{row} " + " ".join(picks[i, :6]), "pos": " ".join(picks[i, 6:22]),
                    "neg": " ".join(picks[i, 22:]), "task_name": f"task{row % tasks}"}) + "\n")


def memory_status(*fields: str) -> dict[str, int]:
    """The given fields of /proc/self/status (`VmHWM`, `RssAnon`, `RssFile`, ...: sizes in kB there), in bytes."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    missing = [f for f in fields if f not in status]
    if missing:
        raise RuntimeError(f"no {', '.join(missing)} in /proc/self/status: memory is measured on Linux only")
    return {f: int(status[f].split()[0]) * 1024 for f in fields}


class PhaseMeter:
    """Samples /proc/self/status every 20 ms, and at every phase boundary: the peak RssAnon and RssFile of the
    current phase, which `reset` starts (and `started` holds its start's wall-clock and CPU times). The boundary
    reading matters for phases shorter than a sampling interval, or when a loaded machine does not schedule the
    sampling thread during a phase at all."""

    def __init__(self) -> None:
        self.reset()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.sample()

    def sample(self) -> None:
        memory = memory_status("RssAnon", "RssFile")
        self.anon, self.file = max(self.anon, memory["RssAnon"]), max(self.file, memory["RssFile"])

    def reset(self) -> None:
        self.anon = self.file = 0
        self.sample()
        self.started = time.perf_counter(), time.process_time()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def measure(rows: int, work_dir: Path, batch_size: int, tokenize: bool = True, streaming: bool = False) -> dict:
    datasets.config.HF_DATASETS_CACHE = work_dir / "hf_cache"
    datasets.disable_progress_bars()
    path = work_dir / f"rows-{rows}.jsonl"
    if not path.is_file():
        write_rows(path, rows)
    tokenizer = load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")
    cfg = DataConfig(path=str(path))
    result: dict = {"rows": rows, "file_mb": path.stat().st_size / 2**20, "batch_size": batch_size,
                    "start_anon_mb": memory_status("RssAnon")["RssAnon"] / 2**20, "phases": {}}
    meter = PhaseMeter()

    def phase(name: str) -> None:
        wall, cpu = time.perf_counter() - meter.started[0], time.process_time() - meter.started[1]
        meter.sample()
        result["phases"][name] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                                  "cpu_us_per_row": round(cpu / rows * 1e6, 2),
                                  "peak_anon_mb": round(meter.anon / 2**20), "peak_file_mb": round(meter.file / 2**20)}
        meter.reset()

    if streaming:
        stream = StreamingBatches(DataConfig(path=str(path), streaming=True), TripletCollator(tokenizer, tokenizer),
                                  tokenizer, 128, tokenizer, 128, batch_size=batch_size)
        batches = sum(1 for _ in islice(stream, rows // batch_size))
        phase("stream")
        result["state_kb"] = round(len(json.dumps(stream.state_dict())) / 1024, 1)
    else:
        ds, _ = load_triplets(cfg)
        phase("load_validate")
        if tokenize:
            ds, _ = tokenize_triplets(ds, tokenizer, 128, tokenizer, 128)
            count_tokens(ds)
            phase("tokenize")
        sampler = build_sampler(ds, cfg, batch_size, 1, 0, 1, 0)
        phase("sampler")
        batches = sum(1 for _ in (build_dataloader(ds, sampler, TripletCollator(tokenizer, tokenizer)) if tokenize
                                  else sampler))
        phase("epoch" if tokenize else "epoch_plan")
    meter.close()
    result["batches"] = batches
    result["peak_rss_mb_incl_file_pages"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    result["peak_anon_mb"] = max(p["peak_anon_mb"] for p in result["phases"].values())
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gist_scale.tools.data_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--work-dir", help="keep the JSONL and the datasets cache here (default: a temporary folder)")
    parser.add_argument("--no-tokenize", action="store_true", help="skip tokenization and collation (see above)")
    parser.add_argument("--streaming", action="store_true", help="measure data.streaming instead (see above)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Without --work-dir, a temporary folder, deleted afterwards.
    with (contextlib.nullcontext(args.work_dir) if args.work_dir else
          tempfile.TemporaryDirectory(prefix="gist-data-memory-", ignore_cleanup_errors=True)) as work:
        Path(work).mkdir(parents=True, exist_ok=True)
        print(json.dumps(measure(args.rows, Path(work), args.batch_size, tokenize=not args.no_tokenize,
                                 streaming=args.streaming)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
