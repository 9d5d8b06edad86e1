"""Atomic, resumable checkpoints under RUN/checkpoints/step_N/.

Every rank writes its part with `accelerator.save_state` (ZeRO shards included) into a temporary directory; the
main process then writes `trainer_state.json` (step, epoch, sampler position), `run.json` (what the run is and
where its data stands, in global batches: see `gist_scale.resume`) and the completion marker, and only then
renames the directory to `step_N`. A job killed mid-save leaves a `.tmp-step_N` directory, or a `step_N`
without its marker, both of which resume ignores (and reports), so the previous checkpoint stays the one used.

The marker lists every file with its size, so a file that is later deleted, truncated or overwritten is named in
the error instead of surfacing as an obscure deserialization failure deep inside torch or DeepSpeed.

Fault injection (tests only, `gist_scale.faults`): `GIST_SCALE_FAULT=die_during_checkpoint_save[:STEP]` kills the
main process in the middle of the save of step STEP.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from gist_scale.config import ModelConfig
from gist_scale.model import Embedder, load_student, load_tokenizer

from gist_scale import faults

COMPLETE_MARKER = "complete.json"
STATE_FILE = "trainer_state.json"
RUN_FILE = "run.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable; the message names the file."""


@dataclass
class TrainerState:
    """What `save_state` does not know: where the loop is."""

    step: int = 0
    """Optimizer steps taken, skipped ones included."""
    epoch: int = 0
    """Current epoch, of a batch source with epochs (`gist_scale.trainer.batches`)."""
    position: int = 0
    """Micro-batches of `epoch` consumed (the sampler resumes right after them). The same on every rank and for
    every world size: each rank takes one slice of every micro-global batch, `grad_accum_steps` per global batch."""
    nonfinite_in_a_row: int = 0
    """Consecutive skipped non-finite steps."""
    stream: dict | None = None
    """The JSON state of a batch source without epochs, the same on every rank and for every world size: with
    `data.streaming` the stream's position and buffered rows (`StreamingBatches.state_dict()`); None otherwise."""


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = checkpoint_dir.iterdir() if checkpoint_dir.is_dir() else []
    complete = [path for path in found if _STEP_DIR.match(path.name) and (path / COMPLETE_MARKER).is_file()]
    return sorted(complete, key=lambda path: int(path.name.removeprefix("step_")))


def incomplete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Leftovers of interrupted saves: temporary directories and step directories without the marker."""
    found = checkpoint_dir.iterdir() if checkpoint_dir.is_dir() else []
    return sorted(path for path in found if path.name.startswith(".tmp-")
                  or (_STEP_DIR.match(path.name) and not (path / COMPLETE_MARKER).is_file()))


def save_checkpoint(accelerator: Accelerator, checkpoint_dir: Path, state: TrainerState, keep_last: int,
                    run: dict, state_kwargs: dict | None = None) -> Path:
    """Save on every rank, with `run` as `run.json`; returns the final directory. All ranks must call this at the
    same step. `state_kwargs` go to `accelerator.save_state` (LoRA leaves the frozen base out:
    `gist_scale.model.lora`).

    A save that fails with an `OSError` (disk full, quota, I/O error, a vanished directory) removes its temporary
    directory and raises `CheckpointError`: the newest complete checkpoint stays the newest, and nothing half-written
    is left behind. Each rank cleans up only after its own failure; its peers then see it leave (a collective error).
    """
    final = checkpoint_dir / f"step_{state.step}"
    tmp = checkpoint_dir / f".tmp-step_{state.step}"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), **(state_kwargs or {}))
        # Each rank's loop position can differ only in principle (same sampler length on every rank); store rank 0's.
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state)))
            (tmp / RUN_FILE).write_text(json.dumps(run, indent=1))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if faults.requested("die_during_checkpoint_save", state.step):
                print(f"{faults.FAULT_ENV}: exiting with 137 in the middle of saving step {state.step}", flush=True)
                os._exit(137)
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            marker = tmp / COMPLETE_MARKER
            marker.write_text(json.dumps({"step": state.step, "files": files}))
            with open(marker, "rb") as handle:
                os.fsync(handle.fileno())
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in complete_checkpoints(checkpoint_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        newest = complete_checkpoints(checkpoint_dir)
        kept = f"the newest complete checkpoint is still {newest[-1]}" if newest else "no checkpoint was kept"
        raise CheckpointError(f"saving checkpoint step_{state.step} in {checkpoint_dir} failed: {error}; the "
                              f"unfinished save was removed and {kept}. Free space (or set train.output_dir "
                              "elsewhere) and start again with --resume auto") from error
    accelerator.wait_for_everyone()
    return final


def resolve_resume(resume: str | None, checkpoint_dir: Path) -> Path | None:
    """`auto` -> newest complete checkpoint or None (fresh start); a path -> that checkpoint, verified."""
    if resume is None:
        return None
    if resume == "auto":
        complete = complete_checkpoints(checkpoint_dir)
        return complete[-1] if complete else None
    path = Path(resume)
    if not (path / COMPLETE_MARKER).is_file():
        raise CheckpointError(f"{path / COMPLETE_MARKER}: missing; {path} is not a complete checkpoint "
                              f"(an interrupted save?). Use --resume auto to pick the newest complete one.")
    return path


def verify_checkpoint(path: Path) -> None:
    """Every file the marker lists must still be there, with the size it had when saved; name the first that is not."""
    marker = path / COMPLETE_MARKER
    try:
        listed = json.loads(marker.read_text())["files"]
        if not isinstance(listed, dict):
            raise TypeError("'files' is not a mapping of file names to sizes")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{marker}: unreadable completion marker ({error}); the checkpoint {path} cannot be "
                              f"trusted: resume from an older one with --resume PATH") from error
    for name, size in listed.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in {marker} but missing; the checkpoint is damaged: resume from "
                                  f"an older one with --resume PATH")
        if file.stat().st_size != size:
            raise CheckpointError(f"{file}: {file.stat().st_size} bytes, but {size} when the checkpoint was saved; "
                                  f"the file is truncated or was overwritten: resume from an older checkpoint with "
                                  f"--resume PATH")


def _unreadable_file(path: Path) -> str | None:
    """After a failed load: the error naming the first checkpoint file that does not deserialize, and why; None if
    all do.

    Cheap enough for multi-GB ZeRO shards: safetensors files are opened (header only) and torch files are
    memory-mapped, so tensor data is not read. Runs only on the error path.
    """
    import torch
    from safetensors import safe_open

    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as handle:
                    handle.keys()
            elif file.suffix in (".bin", ".pt", ".pkl", ".pth"):
                if not zipfile.is_zipfile(file):
                    raise ValueError("not a torch.save archive")
                # Our own checkpoint, so full unpickling is fine; weights_only would reject Accelerate's RNG states.
                torch.load(file, map_location="cpu", mmap=True, weights_only=False)
        except Exception as error:  # any failure to deserialize is what we are looking for
            return f"{file}: corrupted, it cannot be deserialized ({type(error).__name__}: {error})"
    return None


def load_checkpoint(accelerator: Accelerator, path: Path, load_from: Path | None = None,
                    state_kwargs: dict | None = None) -> TrainerState:
    """Restore model, optimizer, scheduler, RNG states and the loop position from a complete checkpoint, verified
    already (`gist_scale.resume.RunRecord.read`, before anything loads).

    `load_from`: a directory holding the same state in another layout's form (converted by `gist_scale.resume`
    for another world size or for a run without DeepSpeed) to hand to `accelerator.load_state` instead of `path`.
    `state_kwargs` go to `accelerator.load_state`, as those of `save_checkpoint` to `save_state`.
    """
    state_file = path / STATE_FILE
    try:
        state = TrainerState(**json.loads(state_file.read_text()))
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"{state_file}: unreadable trainer state ({error})") from error
    try:
        accelerator.load_state(str(load_from or path), **(state_kwargs or {}))
    except Exception as error:  # torch/DeepSpeed raise many types; name the file where we can find it
        where = _unreadable_file(load_from or path) or f"{path}: could not load the saved state ({error})"
        raise CheckpointError(f"{where}; resume from an older checkpoint with --resume PATH") from error
    accelerator.wait_for_everyone()
    return state


def load_checkpoint_embedder(path: Path, max_length: int | None = None
                             ) -> tuple[Embedder, PreTrainedTokenizerBase, int]:
    """The student of a complete checkpoint (RUN/checkpoints/step_N) as an `Embedder`, its tokenizer and length.

    The model is built as the run's `config.yaml` (two levels up) describes it and given the checkpoint's weights:
    `model.safetensors` (one process, DDP), or DeepSpeed's shards consolidated to fp32 by DeepSpeed's own
    `zero_to_fp32`. `max_length` overrides the run's.
    """
    verify_checkpoint(path)
    config_file = path.parent.parent / "config.yaml"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: no such file; a checkpoint is read with its run's config.yaml")
    cfg = ModelConfig(**(yaml.safe_load(config_file.read_text()) or {}).get("model", {}))
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(path / "model.safetensors")
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # accelerate's save_state names the DeepSpeed checkpoint of the (only) model "pytorch_model".
        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag="pytorch_model")
    embedder = load_student(cfg)
    embedder.load_state_dict(state)
    return embedder, load_tokenizer(cfg.name, cfg.revision, cfg.trust_remote_code), max_length or cfg.max_length
