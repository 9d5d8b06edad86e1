#!/usr/bin/env bash
# gist-scale on one node with G GPUs: DDP by default, DeepSpeed ZeRO with --zero STAGE.
#
#   launch/local_multi_gpu.sh                                   # DDP on every visible GPU, the quickstart
#   launch/local_multi_gpu.sh --gpus 8 --zero 2 --config my_run.yaml --train.batch_size 64
#   launch/local_multi_gpu.sh --gpus 8 --zero 2 --config my_run.yaml --resume auto   # continue that run
#
# Options, before the trainer's flags:
#   --gpus G                 processes, one per GPU (default: every GPU torch sees)
#   --zero 1|2|3|3-offload   DeepSpeed ZeRO stage (accelerate_configs/zeroN.yaml); default: DDP
#   --port P                 rendezvous port (default 0: a free one)
#   --dry-run                print the command instead of running it
# Everything else goes to `gist-scale train` (`--section.key VALUE`, `--config FILE`, `--resume auto|PATH`).
# On a machine without GPUs, `launch/local_multi_gpu.sh --gpus 2` runs 2 CPU processes (DDP over gloo).
set -euo pipefail
# Absolute paths to the configs, so that the script runs from any directory and relative paths in the trainer's
# flags (--config, --train.output_dir) keep meaning what they mean where it was started.
repo=$(cd "$(dirname "$0")/.." && pwd)

die() { echo "local_multi_gpu.sh: $*" >&2; exit 2; }
gpus='' zero='' port=0 dry_run=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --gpus) gpus=${2:?--gpus needs a count}; shift 2 ;;
        --gpus=*) gpus=${1#*=}; shift ;;
        --zero) zero=${2:?--zero needs a stage}; shift 2 ;;
        --zero=*) zero=${1#*=}; shift ;;
        --port) port=${2:?--port needs a number}; shift 2 ;;
        --port=*) port=${1#*=}; shift ;;
        --dry-run) dry_run=1; shift ;;
        --) shift; break ;;
        *) break ;;  # the first trainer flag: it and everything after it go to the trainer
    esac
done

if [[ -z $gpus ]]; then
    # torch, not nvidia-smi: it honours CUDA_VISIBLE_DEVICES.
    gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())') ||
        die "could not ask torch for the GPU count: activate the environment gist-scale is installed in"
fi
[[ $gpus =~ ^[1-9][0-9]*$ ]] || die "no GPU found (or --gpus $gpus is not a count): pass --gpus G"

ds_args=()
case $zero in
    '') if ((gpus == 1)); then name=single_gpu; else name=multi_gpu; fi ;;
    1 | 2 | 3) name=zero$zero ;;
    3-offload | 3_offload) name=zero3_offload ;;
    *) die "--zero $zero: use 1, 2, 3 or 3-offload (or leave it out for DDP)" ;;
esac
config=$repo/accelerate_configs/$name.yaml
if [[ -n $zero ]]; then
    # The YAML names its DeepSpeed JSON relative to the repository root; this works from any directory.
    ds_args=(--deepspeed_config_file "$repo/ds_configs/$name.json")
fi

# A USR1 or TERM to the launcher (a scheduler's preemption warning) reaches the trainers, which finish the step,
# checkpoint and exit with 124; without this the torchrun agent dies of USR1 and orphans them.
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${PREEMPT_GRACE_S:-110}

cmd=(accelerate launch --config_file "$config" "${ds_args[@]}" --num_machines 1 --num_processes "$gpus"
     --main_process_port "$port" -m gist_scale train "$@")
if ((dry_run)); then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
