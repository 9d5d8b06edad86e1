"""`gist-scale cache-guide`: the frozen guide's embeddings of every training text, computed once.

The guide never changes, yet without a cache it re-embeds every query, positive and negative in every step of every
epoch (for a small student with a large guide that is most of the step's FLOPs). This command embeds the training
data once, sharded over all ranks of a `torchrun`/`accelerate launch` job, and training with `--guide.cache DIR`
then reads the embeddings by row index: the guide is neither loaded nor tokenized for.

Layout of DIR (all `datasets`/Arrow, memory-mapped when read)::

    gist_guide_cache.json             the key below, shapes, shard list; written last, so it marks completion
    shard-00000-of-00002.arrow        rows [0, N/2): columns query [Dg], pos [Dg], neg [S*Dg]
    shard-00001-of-00002.arrow        ... float16 fixed-size lists (Arrow has no bf16; |values| <= 1 here)

S is the candidate slots per row, in the batches' layout (`TripletBatch.num_negatives`): K hard negatives, after
P-1 extra positive slots with `data.num_positives` P > 1 (the rows are tokenized and collated as training does, so
the cache holds each slot's embedding, an empty slot's being its row's first positive's).

The key fingerprints what the embeddings depend on: the guide's name, revision, pooling, normalization, max length
and weight dtype, a sampled digest of its files when it is a local directory, and the `datasets` fingerprint of the
validated training rows (the data files and every `data.*` option that shapes the rows), their count, K and P.
Training refuses a cache whose key differs from its own configuration, naming the fields that differ.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from accelerate.utils import send_to_device
from datasets.arrow_writer import ArrowWriter
from jsonargparse import ArgumentParser
from rich.console import Console
from transformers import AutoConfig

from gist_scale import chunking, distributed, encode, inference
from gist_scale.config import ConfigError, GuideConfig, JobConfig
from gist_scale.data import DataError, TripletBatch, TripletCollator, load_triplets, tokenize_triplets
from gist_scale.model import load_guide, load_tokenizer, resolve_model_path
from gist_scale.model.prompts import Prompts, load_task_instructions
from gist_scale.options import job_parser, parse_job
from gist_scale.places import require_writable_dir

__all__ = ["GuideCache", "GuideCacheError", "build_guide_cache", "cache_key", "open_guide_cache", "main"]

console = Console(stderr=True, highlight=False, soft_wrap=True)

FORMAT = "gist-scale guide cache"
VERSION = 1
META_FILE = "gist_guide_cache.json"
_DIGEST_FILES = (".safetensors", ".bin", ".json", ".txt", ".model")
_DIGEST_SAMPLES = 16
_DIGEST_BLOCK = 1 << 16


class GuideCacheError(ConfigError):
    """The guide cache is missing, incomplete or built for another guide or data; the message says how to fix it."""


# ------------------------------------------------------------------------------------------------------ key


def guide_digest(name: str) -> str | None:
    """A digest of a local guide directory's files (names, sizes, sampled content); None for a hub name.

    Sampled rather than full so that checking a multi-GB guide takes milliseconds; a retrained or replaced
    checkpoint changes the sampled bytes and the sizes.
    """
    path = Path(resolve_model_path(name))
    if not path.is_dir():
        return None
    digest = hashlib.blake2b(digest_size=16)
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _DIGEST_FILES):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path)}:{size}".encode())
        with file.open("rb") as handle:
            for offset in np.linspace(0, max(size - _DIGEST_BLOCK, 0), _DIGEST_SAMPLES).astype(np.int64):
                handle.seek(int(offset))
                digest.update(handle.read(_DIGEST_BLOCK))
    return digest.hexdigest()


def _num_positives(dataset: datasets.Dataset) -> int:
    """P, the positives per row of `load_triplets`' rows: 1 + the length of their `extra_pos` lists."""
    if "extra_pos" not in dataset.column_names:
        return 1
    # Through the format, not `dataset.data`: a dataset whose rows were selected (bad or filtered rows dropped) keeps
    # its whole table underneath.
    lengths = pc.unique(pc.list_value_length(dataset.with_format("arrow")["extra_pos"])).to_pylist()
    if len(lengths) > 1:  # a mixture whose sources differ in P
        raise GuideCacheError("the guide cache stores the same candidate slots for every row, and the data.sources "
                              "differ in num_positives: give every source the same num_positives, or train without "
                              "guide.cache")
    return 1 + lengths[0]


def cache_key(guide: GuideConfig, dataset: datasets.Dataset, num_negatives: int | None,
              instructions: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What the cached embeddings depend on; two configurations with equal keys get the same embeddings.

    `num_negatives` is K, the hard negatives per row (`DataReport.num_negatives`); the positives per row come from
    `dataset` itself."""
    if num_negatives is None:  # a mixture whose sources differ in K (DataReport.num_negatives)
        raise GuideCacheError("the guide cache stores K negatives per row, and the data.sources differ in K: give "
                              "every source the same num_negatives, or train without guide.cache")
    prompts = Prompts.from_config(guide, instructions)
    return {"guide": guide.name, "revision": guide.revision, "pooling": guide.pooling,
            "max_length": guide.max_length, "dtype": guide.dtype,
            "prompts": {"named": prompts.named(), "include_prompt": prompts.include_prompt},
            "dataset_fingerprint": dataset._fingerprint, "rows": len(dataset), "num_negatives": num_negatives,
            "num_positives": _num_positives(dataset)}


def _slots(key: Mapping[str, Any]) -> int:
    """The candidate slots per row that a cache with this key stores: P-1 extra positives and K negatives."""
    return int(key["num_positives"]) - 1 + int(key["num_negatives"])


_KEY_OPTIONS = {"guide": "--guide.name", "revision": "--guide.revision", "pooling": "--guide.pooling",
                "max_length": "--guide.max_length", "dtype": "--guide.dtype",
                "prompts": "--guide.query_prompt, document_prompt, query_prompt_template, pool_prompt or "
                           "--data.task_instructions",
                "dataset_fingerprint": "the --data.* options or the data files", "rows": "--data.max_rows or the data",
                "num_negatives": "--data.neg_columns or the data", "num_positives": "--data.num_positives"}


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class CacheMeta:
    format: str
    version: int
    key: dict[str, Any]
    digest: str | None
    dim: int
    dtype: str
    shards: list[str]
    created: str
    seconds: float


class GuideCache:
    """A validated cache: `lookup(row indices)` returns the guide embeddings of those dataset rows."""

    def __init__(self, path: Path, meta: CacheMeta) -> None:
        self.meta = meta
        self.k = _slots(meta.key)
        """Candidate slots per row (`TripletBatch.num_negatives`)."""
        self.dataset = datasets.concatenate_datasets([datasets.Dataset.from_file(str(path / s)) for s in meta.shards])
        if len(self.dataset) != meta.key["rows"]:
            raise GuideCacheError(f"guide cache {path}: {len(self.dataset)} rows on disk, its metadata says "
                                  f"{meta.key['rows']}; rebuild it with `gist-scale cache-guide`")

    def lookup(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """`{"query": [B, Dg], "pos": [B, Dg], "neg": [B, K, Dg]}` float16 tensors, K the candidate slots per row in
        the batches' layout (no `neg` when K is 0)."""
        # Through the `datasets` object, not a kept pyarrow table: DataLoader workers receive this object pickled,
        # and a memory-mapped `datasets.Dataset` pickles as its file paths, a raw table as all of its data.
        taken = self.dataset.data.table.take(pa.array(indices, type=pa.int64()))
        out = {}
        for column in chunking.COLUMNS if self.k else chunking.COLUMNS[:2]:
            values = taken.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            shape = (len(indices), self.k, self.meta.dim) if column == "neg" else (len(indices), self.meta.dim)
            out[column] = torch.from_numpy(values.reshape(shape).copy())  # Arrow buffers are read-only
        return out

    def attach(self, dataset, collator) -> tuple[_IndexedRows, Callable[[Sequence[Mapping[str, Any]]], TripletBatch]]:
        """Wrap the tokenized training dataset and the collator so that batches carry `guide_embeddings`.

        The collator is a `partial` of a module function, not a closure: DataLoader workers may receive it pickled."""
        return _IndexedRows(dataset), partial(_with_cached_guide, collator, self)


class _IndexedRows(torch.utils.data.Dataset):
    """The tokenized dataset, with each row's index in `_row` so the collator can look its embeddings up; read a
    batch at a time (`__getitems__`), as the DataLoader reads it."""

    def __init__(self, dataset: datasets.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: list[int]) -> list[dict]:
        return [{**row, "_row": index} for row, index in zip(self.dataset.__getitems__(indices), indices)]


def _with_cached_guide(collator: TripletCollator, cache: GuideCache, rows: Sequence[Mapping[str, Any]]) -> TripletBatch:
    """`TripletCollator`'s batch with `guide_embeddings` from the cache (the collator pads only the student)."""
    return replace(collator(rows), guide_embeddings=cache.lookup([row["_row"] for row in rows]))


def _read_meta(path: Path) -> CacheMeta:
    meta_file = path / META_FILE
    if not path.is_dir():
        raise GuideCacheError(f"guide.cache={path}: no such directory; build it with `gist-scale cache-guide "
                              f"{path}` and the same --data.* and --guide.* options as training")
    if not meta_file.is_file():
        raise GuideCacheError(f"guide.cache={path}: no {META_FILE}, so the cache is incomplete (an interrupted "
                              f"`gist-scale cache-guide`?) or not a guide cache; rebuild it")
    try:
        meta = CacheMeta(**json.loads(meta_file.read_text()))
    except (TypeError, ValueError) as error:
        raise GuideCacheError(f"{meta_file}: unreadable ({error}); rebuild the cache") from error
    if meta.format != FORMAT or meta.version != VERSION:
        raise GuideCacheError(f"{meta_file}: format {meta.format!r} version {meta.version}, this gist-scale reads "
                              f"{FORMAT!r} version {VERSION}; rebuild the cache")
    missing = [shard for shard in meta.shards if not (path / shard).is_file()]
    if missing:
        raise GuideCacheError(f"guide cache {path}: shard(s) {missing} are missing; rebuild it")
    return meta


def open_guide_cache(guide: GuideConfig, dataset: datasets.Dataset, num_negatives: int,
                     instructions: Mapping[str, str] | None = None) -> GuideCache:
    """Open `guide.cache` for the validated training rows `dataset`, refusing a stale or mismatched cache.

    `dataset` is what `load_triplets` returned (before tokenization); its fingerprint must be the cache's.
    `instructions` are the task instructions (`data.task_instructions`), part of the guide's prompts.
    """
    path = Path(guide.cache).expanduser()
    meta = _read_meta(path)
    expected = cache_key(guide, dataset, num_negatives, instructions)
    differ = [f"{field}: cache {meta.key.get(field)!r}, this run {value!r} ({_KEY_OPTIONS[field]})"
              for field, value in expected.items() if meta.key.get(field) != value]
    if differ:
        raise GuideCacheError(f"guide cache {path} was built for another guide or data, refusing it:\n  "
                              + "\n  ".join(differ)
                              + f"\nrebuild it: gist-scale cache-guide {path} (with this run's --data.* and "
                                "--guide.* options), or drop --guide.cache")
    digest = guide_digest(guide.name)
    if meta.digest is not None and digest is not None and digest != meta.digest:
        raise GuideCacheError(f"guide cache {path}: the files of guide {guide.name} changed since the cache was "
                              f"built (digest {meta.digest} -> {digest}); rebuild the cache")
    if meta.digest is not None and digest is None:
        console.print(f"[yellow]guide {guide.name} is not on this machine: the cache {path} is checked by name, "
                      "revision and settings only")
    return GuideCache(path, meta)


# ---------------------------------------------------------------------------------------------- building


def _features(dim: int, k: int) -> datasets.Features:
    vector = datasets.List(datasets.Value("float16"), length=dim)
    features = {"query": vector, "pos": vector}
    if k:
        features["neg"] = datasets.List(datasets.Value("float16"), length=k * dim)
    return datasets.Features(features)


def build_guide_cache(cfg: JobConfig, out_dir: str | Path, rows_per_batch: int = 512, chunk_size: int = 256) -> Path:
    """Embed every training row's texts with the guide, this rank's contiguous share of the rows; returns DIR.

    Every rank of the job must call it. The metadata is written by the main process after all shards exist.

    The rows are split over the ranks by `gist_scale.inference.shards`, as in every sharded inference; the texts
    are not encoded by `encode_texts`, though: each row is tokenized, chunked and embedded as training does for the
    guide's side (per-task instructions, `TripletCollator`, `encode.embed_frozen`), so the cache holds what the
    live guide computes in training, and each rank writes its rows' embeddings to its own shard file instead of
    gathering every row onto every rank.
    """
    state = distributed.launch_state(cfg.train.collective_timeout_s)
    out = Path(out_dir).expanduser()
    start_time = time.perf_counter()
    tokenizer, tokenized, key = _guide_rows(cfg, state)
    k = _slots(key)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / META_FILE).unlink(missing_ok=True)  # the cache is incomplete until the new metadata is written
    state.wait_for_everyone()

    guide = load_guide(cfg.guide, state.device)
    chunks = chunking.num_chunks(rows_per_batch * (2 + k), chunk_size)
    collator = TripletCollator(tokenizer, None, cfg.data.pad_to_multiple_of, chunks=chunks)
    world, rank = state.num_processes, state.process_index
    rows = inference.shards(len(tokenized), world)[rank]
    writer = ArrowWriter(features=_features(guide.dim, k), path=str(out / _shard_name(rank, world)))
    for begin in range(0, len(rows), rows_per_batch):
        index = list(rows[begin:begin + rows_per_batch])
        batch = send_to_device(collator(tokenized.__getitems__(index)).student, state.device)
        embeddings = zip(chunking.COLUMNS, encode.embed_frozen(guide, batch, k))
        writer.write_batch({column: _float16_rows(values) for column, values in embeddings if values is not None})
        if state.is_main_process and (begin // rows_per_batch) % 20 == 0:
            console.print(f"cache-guide: rank 0 embedded {begin + len(index)}/{len(rows)} rows (x{world} ranks)")
    writer.finalize()
    state.wait_for_everyone()
    if state.is_main_process:
        meta = CacheMeta(FORMAT, VERSION, key, guide_digest(cfg.guide.name), guide.dim, "float16",
                         [_shard_name(r, world) for r in range(world)],
                         time.strftime("%Y-%m-%dT%H:%M:%S"), time.perf_counter() - start_time)
        (out / META_FILE).write_text(json.dumps(asdict(meta), indent=2) + "\n")
        console.print(f"guide cache: {out} ({len(tokenized)} rows x {2 + k} texts, dim {guide.dim}, float16, "
                      f"{world} shard(s), {meta.seconds:.1f} s)")
    state.wait_for_everyone()
    return out


def _guide_rows(cfg: JobConfig, state: Any) -> tuple[Any, datasets.Dataset, dict[str, Any]]:
    """The guide's tokenizer, the training rows loaded, validated and tokenized for the guide as training tokenizes
    them, and their cache key."""
    if cfg.guide.name is None:
        raise GuideCacheError("cache-guide needs a guide: set --guide.name")
    tokenizer = load_tokenizer(cfg.guide.name, cfg.guide.revision, cfg.guide.trust_remote_code,
                               "--guide.trust_remote_code true")
    instructions = load_task_instructions(cfg.data.task_instructions)
    with state.main_process_first():
        dataset, report = load_triplets(cfg.data)
        # Tokenized as training tokenizes the guide side (the same function and cache), under the `student_` names.
        tokenized, _ = tokenize_triplets(dataset, tokenizer, cfg.guide.max_length, num_proc=cfg.data.num_proc,
                                         student_prompts=Prompts.from_config(cfg.guide, instructions))
    return tokenizer, tokenized, cache_key(cfg.guide, dataset, report.num_negatives, instructions)


def describe_guide_cache(cfg: JobConfig, out_dir: str | Path) -> int:
    """`cache-guide --dry-run`: the rows checked and tokenized as the real run would, then what it would write,
    without loading the guide's weights (its embedding size comes from its config). Returns 0."""
    state = distributed.launch_state(cfg.train.collective_timeout_s)
    _, tokenized, key = _guide_rows(cfg, state)
    slots = _slots(key)
    config = AutoConfig.from_pretrained(resolve_model_path(cfg.guide.name), revision=cfg.guide.revision,
                                        trust_remote_code=cfg.guide.trust_remote_code)
    texts = len(tokenized) * (2 + slots)
    if state.is_main_process:  # float16: 2 bytes a feature
        console.print(f"dry run: cache-guide would embed {len(tokenized):,} rows x {2 + slots} "
                      f"texts = {texts:,} texts with {cfg.guide.name} ({config.hidden_size}-dim, float16) over "
                      f"{state.num_processes} rank(s) into {Path(out_dir).expanduser()}: "
                      f"{texts * config.hidden_size * 2 / 2**30:.2f} GiB")
    state.wait_for_everyone()
    return 0


def _shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.arrow"


def _float16_rows(embeddings: torch.Tensor) -> np.ndarray:
    """`[B, ...]` embeddings as B float16 rows, `[B, F]` (the writer stores each as a fixed-size list)."""
    values = embeddings.float()
    # One device read per tensor (NaN fails the comparison too).
    if not bool(torch.isfinite(values).all() & (values.abs().amax() <= 65504)):
        raise GuideCacheError("guide embeddings are not finite or exceed float16's range (they are L2-normalized, so the "
                              "guide produced NaN/inf: check its weights, or build the cache with --guide.dtype fp32)")
    return values.to(torch.float16).cpu().numpy().reshape(len(values), -1)


def build_parser() -> ArgumentParser:
    """`gist-scale cache-guide`: its own options, and the training config's (its data and guide sections count)."""
    parser = job_parser(
        "gist-scale cache-guide",
        "Embed the training data with the frozen guide once, sharded over the ranks of a torchrun / accelerate "
        "launch job; then train with --guide.cache OUT_DIR. Pass the same --data.* and --guide.* options (or "
        "--config) as for training: they are part of the cache's key, and training refuses a cache built for other "
        "ones.", positional="OUT_DIR")
    parser.add_argument("out_dir", help="directory to write the cache to")
    parser.add_argument("--dry-run", action="store_true",
                        help="check and tokenize the rows, print what would be embedded and the cache's size, and "
                             "exit without loading the guide's weights")
    parser.add_argument("--rows-per-batch", type=int, default=512, help="rows collated per step")
    parser.add_argument("--chunk-size", type=int, default=256, help="texts per guide forward (length-sorted)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = parse_job(build_parser(), argv)
        if args.rows_per_batch < 1 or args.chunk_size < 1:
            raise ConfigError("--rows-per-batch and --chunk-size must be positive")
        require_writable_dir(args.out_dir, "cache-guide OUT_DIR")  # before the guide and the data load
        if args.dry_run:
            return describe_guide_cache(cfg, args.out_dir)
        build_guide_cache(cfg, args.out_dir, args.rows_per_batch, args.chunk_size)
    except (ConfigError, DataError) as error:  # GuideCacheError is a ConfigError
        console.print(f"[red]error:[/red] {error}")
        return 2
    return 0
