"""Shared fixtures: a tiny random BERT and tiny random decoder LLMs for fast end-to-end runs, and the environment
for multi-process runs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import datasets
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# The suite's two workers (README's `-n 2`) share two cores with the ranks they launch (one thread each, see
# launch_env). A second intra-op thread in a worker only contends, and OpenMP's spinning waits make that costly:
# four tiny in-process training runs on a loaded machine took 8.8-9.6 s and 3.7-5.2 s of CPU on one thread, 13.5-40 s
# and 9.2-15.9 s of CPU on two. Commands a test starts without launch_env inherit the setting.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="module")
def hf_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep `datasets`' Arrow caches of in-process runs inside the test's temporary directory."""
    saved = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = tmp_path_factory.mktemp("hf_datasets_cache")
    yield
    datasets.config.HF_DATASETS_CACHE = saved


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT saved with the real MiniLM tokenizer: real code paths at a fraction of the cost."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from gist_scale.model import resolve_model_path

    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def no_weight_reads(monkeypatch) -> None:
    """Any read of a weight file (safetensors, torch.load) fails the test: for code that must not load weights."""
    import safetensors
    import safetensors.torch
    import transformers.modeling_utils

    def refuse(*args, **kwargs):
        raise AssertionError("a weight file was opened")

    for module, name in [(safetensors, "safe_open"), (safetensors.torch, "load_file"), (safetensors.torch, "load"),
                         (transformers.modeling_utils, "safe_open"), (torch, "load")]:
        if hasattr(module, name):
            monkeypatch.setattr(module, name, refuse)


@pytest.fixture(scope="session")
def torch_extensions_dir(tmp_path_factory) -> str:
    """DeepSpeed JIT-compiles its CPU communication op on first use (~45 s); build it once per test session."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(tmp_path_factory.mktemp("torch_extensions"))


_USES_DEEPSPEED = pytest.StashKey[bool]()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Whether the selected tests start processes that may load DeepSpeed's op (they take `launch_env` or
    `torch_extensions_dir`)."""
    session.config.stash[_USES_DEEPSPEED] = any(
        {"launch_env", "torch_extensions_dir"} & set(getattr(item, "fixturenames", ())) for item in session.items)


@pytest.fixture(scope="session", autouse=True)
def deepspeed_op_built_in_the_background(request: pytest.FixtureRequest) -> Iterator[None]:
    """Build DeepSpeed's CPU communication op (~45 s; only loaded, ~3 s, once built) in a process of its own from the
    start of a session that will need it, on one core (MAX_JOBS=1): it then compiles beside the first tests instead
    of inside the first DeepSpeed test. A process that needs the op before it is built waits on torch's build lock
    and loads it. Awaited at the end, never killed: a killed build leaves its lock file, on which every later build
    in that directory would wait."""
    if not request.config.stash.get(_USES_DEEPSPEED, False) or importlib.util.find_spec("deepspeed") is None:
        yield
        return
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=request.getfixturevalue("torch_extensions_dir"), OMP_NUM_THREADS="1",
               MAX_JOBS="1")
    build = subprocess.Popen([sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield
    build.wait()


@pytest.fixture
def launch_env(torch_extensions_dir):
    """Environment for `torchrun` ranks: one thread each (2 cores), the shared extension cache, the repo importable.
    Layouts: `ddp` or `plain` (neither ACCELERATE_USE_CPU nor DeepSpeed: a bare torchrun, as a user would launch it;
    on a machine without a GPU `launch_plan` makes it DDP over gloo), `cpu` (ACCELERATE_USE_CPU=1, Accelerate's own
    CPU switch) or a ds_configs/ name (DeepSpeed through the environment, without ACCELERATE_USE_CPU).

    Every `ddp` test therefore also proves that a bare torchrun on CPU trains in sync; `cpu` keeps the explicit
    switch covered (tests/test_resume.py, the fault and launch-script tests)."""

    def make(layout: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "ACCELERATE_USE_DEEPSPEED")}
        env.update(OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=torch_extensions_dir,
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if layout == "cpu":
            env["ACCELERATE_USE_CPU"] = "1"
        elif layout.startswith("zero"):
            env["ACCELERATE_USE_DEEPSPEED"] = "true"
            env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(REPO / "ds_configs" / f"{layout}.json")
        elif layout not in ("ddp", "plain"):
            raise ValueError(f"unknown layout {layout!r}: use ddp, plain, cpu or a ds_configs/ name (zero1, zero2 ...)")
        return env

    return make


@pytest.fixture(scope="session")
def tiny_decoder_dir(tmp_path_factory):
    """Factory: `tiny_decoder_dir(family)` is a directory with a 2-layer random decoder LLM of that family and a
    byte-level BPE tokenizer trained on the shipped sample (families: `tests/decoders.py::FAMILIES`), built once per
    session."""
    from decoders import build_decoder

    built: dict[str, Path] = {}

    def make(family: str = "qwen3") -> Path:
        if family not in built:
            built[family] = build_decoder(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return built[family]

    return make
