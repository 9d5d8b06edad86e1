#!/usr/bin/env bash
# gist-scale in one process on one GPU (or the CPU): the place to debug a config, a dataset or a model.
#
#   launch/single_gpu_debug.sh                               # 3 steps of the quickstart, every step logged
#   launch/single_gpu_debug.sh --config my_run.yaml          # the same 3 steps with your config
#   DEBUG=0 launch/single_gpu_debug.sh --config my_run.yaml  # a normal full run on one GPU
#   GPU=3 launch/single_gpu_debug.sh ...                     # which GPU (default: CUDA_VISIBLE_DEVICES, else 0)
#
# Debug mode (DEBUG=1, the default) adds the trainer's --debug (3 steps, autograd anomaly detection, tensor shapes,
# stop at the first non-finite loss) and makes CUDA report a failing kernel where it was launched.
set -euo pipefail

export CUDA_VISIBLE_DEVICES=${GPU:-${CUDA_VISIBLE_DEVICES:-0}}
debug_args=()
if [[ ${DEBUG:-1} != 0 ]]; then
    # Kernels run synchronously, so a CUDA error's traceback points at the op that failed (slow; debug only).
    export CUDA_LAUNCH_BLOCKING=1
    export TORCH_SHOW_CPP_STACKTRACES=1
    debug_args=(--debug)
fi
# Plain Python, no launcher: one process needs no rendezvous, pdb and py-spy attach to it directly, and the
# trainer's exit code is this script's (0 done, 2 bad config/data/checkpoint, 124 after a handled SIGUSR1/SIGTERM
# once its checkpoint is complete). `exec`, so that a signal sent to this script reaches the trainer.
exec "${PYTHON:-python3}" -m gist_scale train "${debug_args[@]}" "$@"
