#!/usr/bin/env bash
# One-GPU benchmark of the speed issue's targets, of mining and of LLM students, in two parts, each sized for a
# single ~10-minute call on one H100/H200.
#
#   bash launch/bench_gpu.sh            # part 1, BERT students and mining (steps 1-5)
#   bash launch/bench_gpu.sh llm        # part 2, Qwen3 students (steps 6-7)
#   # results: $OUT/*.json (or ./bench_out/), a log, and tables on stdout
#
# What it measures (every mode of ours is the trainer's own step, `gist_scale.train.Trainer`, on the trainer's
# batches of a synthetic JSONL file; the reference, sentence-transformers, steps on the same batches and weights):
#   1. base/base, batch 32 and 256: sentence-transformers GISTEmbedLoss vs ours (plain, chunked, guide_cache,
#      grad_cache). Targets: >= 2x ST at batch 256, >= 1.5x at batch 32.
#   2. small/large, batch 256 (and 32): target >= 3x ST at batch 256.
#   3. base student, batch 16384 with GradCache on one GPU (the memory target; ST is not run: it cannot fit).
#   4. ZeRO (needs deepspeed): base/base batch 128, ZeRO-2 vs ZeRO-3 with one forward per column and with all
#      texts in one call (chunk 384 = 128 x 3), one process per stage. Target: ZeRO-3 >= 80% of ZeRO-2.
#   5. Mining: `gist-scale mine` on 50,000 synthetic pairs with a random base guide in bf16: texts embedded per
#      second and queries searched per second, in $OUT/mine.json (its `--stats`).
#   6. (llm) Qwen3-Embedding-0.6B's shape (28 x 1024), full fine-tuning, base guide, batch 32: ST vs ours.
#   7. (llm) Qwen3-Embedding-8B's shape (36 x 4096, weights in bf16), LoRA r=16 on every attention and MLP linear
#      layer, base guide: ST (with the same peft adapters) vs ours at batch 16, then ours alone with GradCache at
#      batch 512 (chunks of 32 texts), where a single pass (ST's) would not fit. Peak memory per mode in the records.
# The time limits below were set without a GPU run (none was lent yet): a run cut at its limit exits 124.
#
# The GPU image (python 3.12, torch, transformers, accelerate, sentence-transformers, pyarrow, rich, pyyaml) lacks
# what the trainer needs besides: datasets and jsonargparse (every step), and deepspeed (step 4). Carry them as
# wheels in .whl/ (git-ignored) and name `.whl` in the device call's `carry`; here, from a machine with PyPI:
#   cp ~/.cache/pip/wheels/*/*/*/*/deepspeed-*.whl .whl/   # deepspeed ships only an sdist; a built wheel works
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       datasets dill multiprocess jsonargparse docstring-parser typeshed-client \
#       hjson pydantic pydantic-core annotated-types typing-inspection
# (and pyarrow, if the image's is older than datasets asks). Without datasets or jsonargparse nothing runs; without
# deepspeed step 4 is skipped. Nothing is downloaded: the models are random configs built locally with a generated
# vocabulary, the data synthetic.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-$PWD/bench_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/bench_gpu.log"

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
# One interpreter checks that every package a run needs is installed and prints the versions, from the packages'
# metadata: importing them would cost seconds here for what each run imports anyway.
if ! python3 -c "import importlib.metadata, importlib.util, sys
missing = [name for name in ('datasets', 'jsonargparse', 'torch', 'transformers') if importlib.util.find_spec(name) is None]
if missing:
    sys.exit('missing: ' + ', '.join(missing))
reference = 'not installed (the st reference is skipped)'
if importlib.util.find_spec('sentence_transformers'):
    reference = importlib.metadata.version('sentence-transformers')
print('torch', importlib.metadata.version('torch'), 'transformers', importlib.metadata.version('transformers'),
      'sentence-transformers', reference)" 2>&1 | tee -a "$LOG"; then
    echo "bench_gpu.sh: the trainer needs datasets and jsonargparse: carry their wheels (see the top of this script)" \
        | tee -a "$LOG"
    exit 1
fi

# BENCH_SMOKE=1: the same runs at the tiny size and short lengths, to check the script on a CPU. small_large is left
# out: its --cases and --batch are what the tiny size replaces, so it would repeat base_base's run.
SMOKE=()
SMOKE_DECODER=()  # the decoder cases' size in smoke mode
MINE=(base 50000)  # guide size, pairs
if [ "${BENCH_SMOKE:-0}" = 1 ]; then
    SMOKE=(--cases tiny --batch 8 --query-len 4-12 --doc-len 8-24 --steps 1 --warmup 1 --threads 1)
    SMOKE_DECODER=(--cases qwen3-tiny/tiny)
    MINE=(tiny 300)
fi

# On a CPU (the smoke mode) DeepSpeed JIT-compiles its shared-memory communication op on first use (40-60 s, more on
# a loaded machine; cached in TORCH_EXTENSIONS_DIR). Build it here, under its own time limit, so the bounded runs
# below time the benchmark and never the compiler. On a GPU NCCL communicates and nothing is built. Only part 1 runs
# DeepSpeed.
HAVE_DEEPSPEED=0
if [ "${1:-}" != llm ]; then
    timeout 900 python3 -c "import torch, deepspeed
if not torch.cuda.is_available():
    from deepspeed.comm.torch import build_shm_op; build_shm_op()" 2>&1 | tail -n 1 | tee -a "$LOG"
    [ "${PIPESTATUS[0]}" = 0 ] && HAVE_DEEPSPEED=1
fi

run() {  # run SECONDS NAME ARGS...: one bench invocation, bounded so that the later ones still get their turn
    local seconds=$1 name=$2
    shift 2
    echo "=== $name: gist-scale bench $*" | tee -a "$LOG"
    timeout --signal=INT "$seconds" python3 -m gist_scale bench "$@" "${SMOKE[@]}" \
        ${SMOKE_DECODER_NOW:+"${SMOKE_DECODER[@]}"} --out "$OUT/$name.json" 2>&1 | tee -a "$LOG"
    echo "=== $name: exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

mine() {  # mine SECONDS SIZE PAIRS: `gist-scale mine` on PAIRS synthetic pairs with a random guide of SIZE
    local seconds=$1 size=$2 pairs=$3 dir="${TMPDIR:-/tmp}/gist_mine_bench"
    # Inputs and the mined file stay out of $OUT (tens of MB); the guide is random, so the negatives mean nothing.
    echo "=== mine: gist-scale mine on $pairs synthetic pairs, random $size guide" | tee -a "$LOG"
    python3 -c "from gist_scale.tools.bench import inputs; inputs.write_mining_inputs('$dir', '$size', $pairs)"
    timeout --signal=INT "$seconds" python3 -m gist_scale mine --data.path "$dir/pairs.jsonl" --data.task_column null \
        --guide.name "$dir/$size" --num-negatives 7 --range-max 100 --sampling top --batch-size 512 \
        --out "$dir/mined.jsonl" --overwrite --stats "$OUT/mine.json" 2>&1 | tee -a "$LOG"
    echo "=== mine: exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

if [ "${1:-}" = llm ]; then
    # The 7B student is built on the GPU and written once in bf16 (14 GB); every mode then loads it from disk.
    SMOKE_DECODER_NOW=${SMOKE_DECODER:+1}
    run 170 qwen3_06b --cases qwen3-0.6b/base --batch 32 --modes st,plain,chunked,grad_cache --steps 6 --warmup 2 \
        --chunk-size 96
    run 260 qwen3_8b_lora --cases qwen3-8b/base --batch 16 --lora-r 16 --modes st,plain,chunked,grad_cache \
        --steps 4 --warmup 2 --chunk-size 48
    run 150 qwen3_8b_lora_512 --cases qwen3-8b/base --batch 512 --lora-r 16 --modes grad_cache --steps 2 \
        --warmup 1 --chunk-size 32
    ls -la "$OUT"
    exit 0
fi

run 160 base_base --cases base/base --batch 32,256 --steps 8 --warmup 3 --chunk-size 128
if [ "${BENCH_SMOKE:-0}" = 1 ]; then
    echo "=== small_large: skipped in smoke mode (at the tiny size it is base_base's run)" | tee -a "$LOG"
else
    run 120 small_large --cases small/large --batch 256,32 --steps 8 --warmup 3 --chunk-size 128
fi
run 140 base_16k --cases base/base --batch 16384 --modes grad_cache --steps 2 --warmup 1 --chunk-size 1024
if [ "$HAVE_DEEPSPEED" = 1 ]; then
    run 120 zero_base_128 --cases base/base --batch 128 --modes plain,zero2,zero3,zero2_chunked,zero3_chunked \
        --steps 8 --warmup 3 --chunk-size 384
else
    echo "=== zero_base_128: skipped (deepspeed not importable or its CPU op did not build; see the wheel recipe" \
        "at the top)" | tee -a "$LOG"
fi
mine 50 "${MINE[@]}"
ls -la "$OUT"
