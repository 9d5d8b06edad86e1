"""The model card (`README.md`) of every exported model, and the optional upload of `RUN/final/` to the Hub.

The card follows the sentence-transformers / Hugging Face Hub convention: YAML front matter (`library_name`,
`pipeline_tag`, `base_model`, `datasets`, `tags`, `license`), written with `huggingface_hub.ModelCardData`, then
Markdown: how to load the model (with `truncate_dim` for Matryoshka models), how it was trained (base model, guide,
data with revisions and row counts, loss, optimizer, batch, layout, steps, wall time), the held-out evaluation
before and after training, and the GISTEmbed citation. Everything comes from the run's resolved config and its
measured facts (`RunFacts`), never from defaults.

`push_to_hub` is a thin call to `HfApi.upload_folder`; it needs network and a token and is not exercised by the
tests (`check_push_to_hub` is: a missing token stops the run before training).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gist_scale.config import ConfigError, ExportConfig, JobConfig
from gist_scale.data import DataReport
from gist_scale.model import resolve_model_path
from gist_scale.plan import RunPlan

__all__ = ["CARD_FILE", "RunFacts", "check_push_to_hub", "push_to_hub", "write_model_card"]

CARD_FILE = "README.md"
BASELINE_FILE = "eval_baseline.json"
"""The starting model's metrics in the run directory, written by the trainer's first evaluation."""

GISTEMBED_BIBTEX = """@misc{solatorio2024gistembed,
    title={GISTEmbed: Guided In-sample Selection of Training Negatives for Text Embedding Fine-tuning},
    author={Aivin V. Solatorio},
    year={2024},
    eprint={2402.16829},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}"""
MATRYOSHKA_BIBTEX = """@misc{kusupati2024matryoshka,
    title={Matryoshka Representation Learning},
    author={Aditya Kusupati and Gantavya Bhatt and Aniket Rege and Matthew Wallingford and Aditya Sinha and
            Vivek Ramanujan and William Howard-Snyder and Kaifeng Chen and Sham Kakade and Prateek Jain and
            Ali Farhadi},
    year={2024},
    eprint={2205.13147},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}"""


@dataclass(frozen=True)
class RunFacts:
    """What the trainer measured, beside its config, for the card."""

    embedding_dim: int
    plan: RunPlan
    steps: int
    total_steps: int
    wall_time_s: float
    data: DataReport
    eval_source: str | None
    """`EvalData.describe()` of the held-out data; None when the run evaluated nothing."""
    metrics: dict[str, float] | None
    """This export's evaluation (the final one for `final/`, the best for `best/`)."""


def write_model_card(destination: str | Path, cfg: JobConfig, facts: RunFacts) -> Path:
    """Write `destination/README.md` for the model exported there; returns its path.

    The baseline (the starting model's metrics) is read from `RUN/eval_baseline.json` when the run wrote one.
    """
    from huggingface_hub import ModelCard, ModelCardData

    baseline_file = Path(cfg.train.output_dir) / BASELINE_FILE
    baseline = json.loads(baseline_file.read_text()) if baseline_file.is_file() else None
    dims = sorted(cfg.loss.matryoshka_dims or [], reverse=True)
    tags = ["sentence-transformers", "sentence-similarity", "feature-extraction", "gist-embed", "gist-scale",
            *(["matryoshka"] if dims else []), f"dataset_size:{facts.data.rows}"]
    hub_data = [cfg.data.path] if _hub_id(cfg.data.path) else None
    data = ModelCardData(library_name="sentence-transformers", pipeline_tag="sentence-similarity", tags=tags,
                         base_model=_hub_id(cfg.model.name), datasets=hub_data,
                         license=cfg.export.license or _base_license(cfg.model.name, cfg.model.revision))
    body = "\n\n".join([_intro(cfg, facts, dims), _usage(cfg, facts, dims, destination), _training(cfg, facts),
                         _evaluation(cfg, facts, baseline, dims), _citation(dims)])
    path = Path(destination) / CARD_FILE
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n").save(path)
    return path


def check_push_to_hub(export: ExportConfig) -> None:
    """Before training: an upload needs a Hub token, or the run would only fail after its last step."""
    from huggingface_hub import get_token

    if export.push_to_hub is not None and get_token() is None:
        raise ConfigError(f"export.push_to_hub={export.push_to_hub}: no Hugging Face token; set HF_TOKEN or run "
                          "`hf auth login` first, or drop export.push_to_hub")


def push_to_hub(folder: str | Path, export: ExportConfig) -> str:
    """Upload an exported model folder (card included) to `export.push_to_hub`; returns the commit URL.

    Untested here (it needs network and a token): a thin call to `huggingface_hub`.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(export.push_to_hub, private=export.private, exist_ok=True)
    return str(api.upload_folder(repo_id=export.push_to_hub, folder_path=str(folder),
                                 commit_message="gist-scale: upload trained model"))


# ------------------------------------------------------------------------------------------------ sections


def _hub_id(name: str | None) -> str | None:
    """`name` when it is a Hub repo id (the front matter accepts nothing else), None for local paths."""
    if name is None or Path(name).expanduser().exists() or name.count("/") > 1 or name.startswith((".", "/", "~")):
        return None
    return name


def _base_license(name: str, revision: str | None) -> str | None:
    """The license in the base model's own card, read offline: a local directory (or the offline copy of MiniLM),
    or the Hub cache. None when it cannot be read without network."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.repocard import metadata_load

    local = Path(resolve_model_path(name)).expanduser()
    card = local / CARD_FILE if local.is_dir() else None
    if card is None and _hub_id(name):
        cached = try_to_load_from_cache(name, CARD_FILE, revision=revision)
        card = Path(cached) if isinstance(cached, str) else None
    if card is None or not card.is_file():
        return None
    license_id = (metadata_load(card) or {}).get("license")
    return license_id if isinstance(license_id, str) else None


def _intro(cfg: JobConfig, facts: RunFacts, dims: list[int]) -> str:
    guide = "none (plain in-batch InfoNCE)" if cfg.guide.name is None else f"`{cfg.guide.name}`"
    matryoshka = (f" Trained as a Matryoshka model: the first {', '.join(map(str, dims))} dimensions are embeddings "
                  "of their own (truncate and re-normalize).") if dims else ""
    return (f"# {Path(cfg.train.output_dir).name}\n\n"
            f"A [sentence-transformers](https://www.sbert.net) model fine-tuned from `{cfg.model.name}` with "
            f"[GISTEmbed](https://arxiv.org/abs/2402.16829) (guided in-sample selection of training negatives; guide "
            f"{guide}) with gist-scale. It maps texts to {facts.embedding_dim}-dimensional "
            f"{'normalized ' if cfg.model.normalize else ''}embeddings for retrieval, clustering and semantic "
            f"similarity.{matryoshka}")


def _usage(cfg: JobConfig, facts: RunFacts, dims: list[int], destination: str | Path) -> str:
    name = cfg.export.push_to_hub or str(destination)
    # A student that ran its repository's code exports that code too (transformers copies it), and
    # sentence-transformers runs it only when told to.
    trust = ", trust_remote_code=True" if cfg.model.trust_remote_code else ""
    lines = ["## Usage", "", "```python", "from sentence_transformers import SentenceTransformer", "",
             f'model = SentenceTransformer("{name}"{trust})']
    smaller = [d for d in dims if d < facts.embedding_dim]
    if smaller:
        lines += [f"# or smaller embeddings (Matryoshka sizes trained: {', '.join(map(str, dims))}):",
                  f'# model = SentenceTransformer("{name}"{trust}, truncate_dim={smaller[0]})']
    lines += ['embeddings = model.encode(["A first sentence.", "Another one."])',
              "similarities = model.similarity(embeddings, embeddings)", "```"]
    if instructions := facts.data.instructions:
        lines += ["", (f"Training prepended each row's task instruction to the {', '.join(instructions)} texts "
                       "(`data.*_instruction`): prepend the same instruction to those texts at inference, e.g. "
                       "`model.encode([instruction + text])`.")]
    return "\n".join(lines)


def _training(cfg: JobConfig, facts: RunFacts) -> str:
    def revision(value: str | None) -> str:
        return f" (revision `{value}`)" if value else ""

    if cfg.guide.name is None:
        guide = "none: plain in-batch InfoNCE"
    elif cfg.guide.cache:
        guide = f"`{cfg.guide.name}`{revision(cfg.guide.revision)}, embeddings precomputed in `{cfg.guide.cache}`"
    else:
        guide = f"`{cfg.guide.name}`{revision(cfg.guide.revision)}, {cfg.guide.dtype}, {cfg.guide.pooling} pooling"
    data, plan = facts.data, facts.plan
    tasks = ", ".join(f"{task} ({rows})" for task, rows in list(data.tasks.items())[:12])
    more = f", ... {len(data.tasks) - 12} more" if len(data.tasks) > 12 else ""
    zero = f"DeepSpeed ZeRO stage {plan.zero_stage}" if plan.zero_stage is not None else "no ZeRO"
    grad_cache = f", GradCache chunks of {cfg.train.chunk_size}" if cfg.train.grad_cache else ""
    source = data.source + (revision(cfg.data.revision) if cfg.data.path else "")
    rows = [("base model", f"`{cfg.model.name}`{revision(cfg.model.revision)}, {cfg.model.pooling} pooling, max length "
                           f"{cfg.model.max_length}"),
            ("guide", guide),
            ("training data", f"{source}: {data.rows:,} rows, {data.num_negatives} hard negative(s) per row"
                              + (f", {data.skipped} bad rows skipped" if data.skipped else "")),
            ("tasks", f"{len(data.tasks)}: {tasks}{more}"),
            ("loss", _settings(cfg.loss)),
            ("optimizer", "AdamW, " + _settings(cfg.optim)),
            ("global batch", f"{plan.global_batch} triplets ({plan.per_device_batch} per device x {plan.world_size} x "
                             f"{plan.grad_accum_steps} accumulation)"),
            ("layout", f"{plan.world_size} process(es), {zero}, precision {plan.mixed_precision}{grad_cache}"),
            ("steps", f"{facts.steps} of {facts.total_steps}"),
            ("wall time", f"{facts.wall_time_s / 60:.1f} min (from start-up to this export)")]
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    return f"## Training\n\n| | |\n|---|---|\n{table}"


def _settings(section: Any) -> str:
    return ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in dataclasses.asdict(section).items()
                     if v is not None)


def _evaluation(cfg: JobConfig, facts: RunFacts, baseline: dict[str, float] | None, dims: list[int]) -> str:
    if facts.metrics is None:
        return "## Evaluation\n\nNo held-out evaluation was configured for this run (`eval.path`)."
    lines = ["## Evaluation", "", f"Held-out retrieval on {facts.eval_source} (step {facts.steps}).", "",
             f"| metric | `{cfg.model.name}` | this model | delta |", "|---|---|---|---|"]
    for name, value in facts.metrics.items():
        before = baseline.get(name) if baseline else None
        cells = ("n/a", "") if before is None else (f"{before:.4f}", f"{value - before:+.4f}")
        lines.append(f"| {name} | {cells[0]} | {value:.4f} | {cells[1]} |")
    if dims:
        lines += ["", ("`metric@D` is the metric on the embeddings truncated to their first D dimensions and "
                       "re-normalized (sentence-transformers' `truncate_dim=D`).")]
    return "\n".join(lines)


def _citation(dims: list[int]) -> str:
    entries = [GISTEMBED_BIBTEX] + ([MATRYOSHKA_BIBTEX] if dims else [])
    return "## Citation\n\n" + "\n\n".join(f"```bibtex\n{entry}\n```" for entry in entries)
