"""The launch scripts, run for real on CPU.

`launch/slurm_multinode.sbatch` runs under stand-in `sbatch`/`srun`/`scontrol`/`scancel` executables (tests/fakes/)
that simulate a 2-node allocation on localhost: the fake srun starts the script's per-node command twice, with
SLURM_NODEID 0 and 1, so two `accelerate launch` processes (machine ranks 0 and 1) rendezvous over TCP and train as
one gloo group of 2 ranks. Nothing of ours is mocked: the script, accelerate, torchrun and the trainer all run.
The fake sbatch behaves like `sbatch --wait` and starts the job again when the script requeues it.
Most runs here set `ACCELERATE_USE_CPU=1`, which turns "GPUs" into CPU processes; the last section launches without
it, as a user would, and checks that every launcher trains in sync with one process or refuses in one line.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

from dist_utils import assert_same_losses, free_port, loss_records, torchrun_command
from gist_scale import distributed, plan
from gist_scale.config import ConfigError
from gist_scale.data import sample_data_path

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SBATCH = LAUNCH / "slurm_multinode.sbatch"
FAKES = Path(__file__).resolve().parent / "fakes"
SCRIPTS = [SBATCH, *(LAUNCH / name for name in ("local_multi_gpu.sh", "single_gpu_debug.sh", "bench_gpu.sh",
                                              "ablation.sh")),
           *sorted(FAKES.iterdir())]
STEPS = 20  # enough steps after the signal or kill for it to land mid-run
TIMEOUT_S = 300  # per job; a hang fails the test instead of the CI run


def train_args(model_dir: Path, *extra: str) -> list[str]:
    # dropout 0 and an fp32 guide (the exactness contract): the losses of launch layouts, of resumed runs and of one
    # process with the whole global batch are then comparable exactly.
    return ["--model.name", str(model_dir), "--guide.name", str(model_dir), "--guide.dtype", "fp32",
            "--model.dropout", "0.0",
            "--train.batch_size", "4", "--train.log_every", "1", "--train.max_steps", str(STEPS), *extra]


def wait_for(condition, what: str, timeout: float = TIMEOUT_S, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended (exit code {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def base_env() -> dict[str, str]:
    """CPU ranks with one thread each (2 cores), this interpreter's tools first on PATH, no SLURM_* of a real job."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "PET_", "TORCHELASTIC"))}
    env.update(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", PYTHONUNBUFFERED="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    return env


class FakeSlurm:
    """A simulated 2-node cluster: the fakes on PATH, their state directory, and one job's run directory."""

    def __init__(self, root: Path, job_id: int, **settings: str) -> None:
        self.root, self.job_id = root, job_id
        self.state, self.run_dir, self.log = root / "slurm", root / "run", root / f"gist-scale-{job_id}.out"
        bin_dir = root / "bin"
        bin_dir.mkdir(parents=True)
        for fake in FAKES.iterdir():  # copied with the exec bit, whatever the checkout did to the modes
            shutil.copy(fake, bin_dir / fake.name)
            (bin_dir / fake.name).chmod(0o755)
        self.state.mkdir()
        self.env = base_env()
        self.env.update(
            PATH=os.pathsep.join([str(bin_dir), self.env["PATH"]]), FAKE_SLURM_DIR=str(self.state),
            FAKE_SLURM_JOB_ID=str(job_id),
            # What a CPU test changes in the script's defaults: DDP (the default ZeRO-2 config works too, but the
            # first DeepSpeed start compiles an extension for minutes), one process per "node", a free port.
            ACCELERATE_CONFIG="accelerate_configs/multi_gpu.yaml", GPUS_PER_NODE="1", MASTER_PORT=str(free_port()),
            RUN_DIR=str(self.run_dir), PREEMPT_GRACE_S="60", **settings)

    def submit(self, *args: str) -> subprocess.Popen:
        # From the repository root, as the script asks; --nodes=2 on the command line, as a user would.
        return subprocess.Popen(["sbatch", "--nodes=2", f"--output={self.root}/%x-%j.out", str(SBATCH), *args],
                                cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finish(self, proc: subprocess.Popen) -> int:
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            raise AssertionError(f"job did not finish in {TIMEOUT_S} s; log:\n{self.log_text()[-5000:]}") from None
        return proc.returncode

    def attempts(self) -> list[tuple[int, int]]:
        """(start, exit code of the batch script) per start of the job."""
        path = self.state / "attempts.log"
        lines = path.read_text().splitlines() if path.is_file() else []
        return [(int(start), int(rc)) for _, start, rc in (line.split() for line in lines)]

    def requeues(self) -> list[str]:
        path = self.state / "requeue.log"
        return path.read_text().splitlines() if path.is_file() else []

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def scancel_batch(self, sig: str) -> None:
        subprocess.run(["scancel", "--batch", f"--signal={sig}", str(self.job_id)], env=self.env, check=True)


def kill_tree(proc: subprocess.Popen) -> None:
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for p in [*children, psutil.Process(proc.pid)] if proc.poll() is None else children:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, tmp_path_factory) -> Path:
    """An uninterrupted run of one process (in this one) with the whole global batch of 8: what 2 ranks x 4 of any
    launch, interrupted or not, must log step for step."""
    from gist_scale.train import main

    run_dir = tmp_path_factory.mktemp("one-process-20") / "run"
    assert main(train_args(tiny_model_dir, "--train.batch_size", "8", "--train.output_dir", str(run_dir))) == 0
    return run_dir


@pytest.fixture(scope="module")
def reference(reference_run) -> dict[int, float]:
    """The losses of `reference_run`, by step."""
    losses = {r["step"]: r["loss"] for r in loss_records(reference_run)}
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


# ------------------------------------------------------------------------------------------------ static checks


def test_scripts_parse_and_are_shellcheck_clean():
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck); bash -n passed")
    result = subprocess.run(["shellcheck", "--shell=bash", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_sbatch_asks_for_preemption_warning_and_requeue():
    directives = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --signal=B:USR1@120" in directives
    assert "#SBATCH --requeue" in directives
    assert "#SBATCH --open-mode=append" in directives


@pytest.mark.parametrize(("flags", "gpus", "config"), [
    ([], "8", "multi_gpu"),
    ([], "1", "single_gpu"),
    (["--zero", "1"], "8", "zero1"),
    (["--zero=2"], "8", "zero2"),
    (["--zero", "3"], "8", "zero3"),
    (["--zero", "3-offload"], "8", "zero3_offload"),
])
def test_local_multi_gpu_flags_pick_the_config(flags, gpus, config, tmp_path):
    # From another directory: the configs are found through the script's own location.
    result = subprocess.run([str(LAUNCH / "local_multi_gpu.sh"), "--gpus", gpus, *flags, "--dry-run",
                             "--train.batch_size", "64"], capture_output=True, text=True, check=True, cwd=tmp_path)
    deepspeed = ["--deepspeed_config_file", f"{REPO}/ds_configs/{config}.json"] if flags else []
    assert result.stdout.split() == [
        "accelerate", "launch", "--config_file", f"{REPO}/accelerate_configs/{config}.yaml", *deepspeed,
        "--num_machines", "1", "--num_processes", gpus, "--main_process_port", "0",
        "-m", "gist_scale", "train", "--train.batch_size", "64"]
    for path in result.stdout.split()[3], *deepspeed[1:]:
        assert Path(path).is_file()


def test_local_multi_gpu_rejects_an_unknown_zero_stage():
    result = subprocess.run([str(LAUNCH / "local_multi_gpu.sh"), "--gpus", "2", "--zero", "4", "--dry-run"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--zero 4" in result.stderr


def test_sbatch_refuses_to_run_outside_a_job():
    result = subprocess.run(["bash", str(SBATCH)], env=base_env(), capture_output=True, text=True, cwd=REPO)
    assert result.returncode != 0 and "submit this script with sbatch" in result.stderr


# ------------------------------------------------------------------------------------------------ real runs


@pytest.mark.slow
def test_sbatch_on_two_simulated_cpu_nodes_trains_like_one_process(tiny_model_dir, reference_run, reference, tmp_path):
    """Without ACCELERATE_USE_CPU, as a user's shell gives it (the fault tests below set it): the 2 nodes form one
    group of 2 and log the loss and gradient norm of one process with the whole global batch at every step."""
    slurm = FakeSlurm(tmp_path, job_id=4242)
    del slurm.env["ACCELERATE_USE_CPU"]
    proc = slurm.submit(*train_args(tiny_model_dir))
    assert slurm.finish(proc) == 0, slurm.log_text()[-5000:]

    log = slurm.log_text()
    # One srun with one task per node; each task is `accelerate launch` with its own machine rank.
    (srun_call,) = (slurm.state / "srun.log").read_text().splitlines()
    for expected in ("--num_machines 2", "--num_processes 2", "--main_process_ip localhost",
                     f"--main_process_port {slurm.env['MASTER_PORT']}", "--resume auto",
                     f"--train.output_dir {slurm.run_dir}"):
        assert expected in srun_call
    assert "machine_rank" in srun_call and "SLURM_NODEID" in srun_call
    # The two machine ranks formed one group of 2 (rank 0 prints the summary once).
    assert log.count("world size 2") == 1 and "world size 1" not in log
    assert slurm.attempts() == [(0, 0)] and slurm.requeues() == []
    assert "training complete (exit code 0)" in log
    assert_same_losses(slurm.run_dir, reference)
    grad_norms = {r["step"]: r["grad_norm"] for r in loss_records(reference_run)}
    for record in loss_records(slurm.run_dir):
        assert record["grad_norm"] == pytest.approx(grad_norms[record["step"]], rel=1e-4), record["step"]
    assert (slurm.run_dir / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_sbatch_sigusr1_checkpoints_requeues_onto_fewer_nodes_and_resumes_with_identical_losses(tiny_model_dir,
                                                                                                reference, tmp_path):
    """`#SBATCH --signal=B:USR1@120`, simulated with `scancel --batch --signal=USR1` as one would on a real cluster;
    preempted on 2 nodes, requeued onto 1 (as `sbatch --nodes=1-2` lets SLURM do): same global batch, same curve.
    (A requeue onto as many nodes as before is the kill -9 test's restart.)"""
    slurm = FakeSlurm(tmp_path, job_id=4243, FAKE_SLURM_REQUEUE_NODES="1")
    proc = slurm.submit(*train_args(tiny_model_dir))
    wait_for(lambda: len(loss_records(slurm.run_dir)) >= 1, "step 1", proc=proc)
    slurm.scancel_batch("USR1")
    assert slurm.finish(proc) == 0, slurm.log_text()[-5000:]

    log = slurm.log_text()
    # First start: the trainers stopped at a step boundary with a complete checkpoint and exit code 124; the script
    # requeued the job and exited 0. Second start, on 1 node: resumed from that checkpoint and completed.
    assert slurm.attempts() == [(0, 0), (1, 0)], log[-5000:]
    assert slurm.requeues() == [f"requeue {slurm.job_id}"]
    preempted_steps = {int(line.split("preempted at step ")[1].split(":")[0])
                       for line in log.splitlines() if "preempted at step" in line}
    assert len(preempted_steps) == 1, "every rank must stop at the same step"
    (step,) = preempted_steps
    assert 1 <= step < STEPS
    assert "checkpoint saved; exiting with 124" in log
    checkpoint = slurm.run_dir / "checkpoints" / f"step_{step}"
    assert (checkpoint / "complete.json").is_file()
    assert "slurm_multinode: preempted (SIGUSR1" in log and f"requeued job {slurm.job_id}" in log
    assert "start 1: 2 nodes x 1 processes" in log and "start 2: 1 nodes x 1 processes" in log
    assert "world size 1  per-device batch 8  grad accum 1  global batch 8" in log
    assert "resuming a checkpoint of 2 processes on 1: same global batch 8, per-device batch 4 -> 8" in log
    assert f"resumed from {checkpoint} at step {step}" in log
    assert "training complete (exit code 0)" in log
    # The interrupted run and its continuation log every step once, with the uninterrupted run's losses.
    assert [r["step"] for r in loss_records(slurm.run_dir)] == list(range(1, STEPS + 1))
    assert_same_losses(slurm.run_dir, reference)


@pytest.mark.slow
def test_sbatch_kill9_of_a_rank_ends_the_job_and_the_restart_resumes(tiny_model_dir, reference, tmp_path):
    timeout_s = 60
    slurm = FakeSlurm(tmp_path, job_id=4244, MAX_FAILURE_REQUEUES="1")
    proc = slurm.submit(*train_args(tiny_model_dir, "--checkpoint.every", "2",
                                    "--train.collective_timeout_s", str(timeout_s)))
    checkpoint = slurm.run_dir / "checkpoints" / "step_2"
    wait_for(lambda: (checkpoint / "complete.json").is_file(), "the step-2 checkpoint", proc=proc)

    def rank1() -> psutil.Process | None:
        for p in psutil.Process(proc.pid).children(recursive=True):
            try:
                if p.environ().get("RANK") == "1" and "gist_scale" in p.cmdline():
                    return p
            except psutil.Error:
                continue
        return None

    victim = rank1()
    assert victim is not None, "rank 1's trainer process not found"
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    wait_for(lambda: len(slurm.attempts()) >= 1, "the first start to end", timeout=timeout_s + 30)
    # Within the collective timeout (gloo notices a dead peer at once; a stalled one takes the full timeout).
    assert time.monotonic() - killed_at < timeout_s
    assert slurm.finish(proc) == 0, slurm.log_text()[-5000:]

    log = slurm.log_text()
    (first_start, first_rc), (second_start, second_rc) = slurm.attempts()
    assert first_rc == 0 and second_rc == 0  # requeued (MAX_FAILURE_REQUEUES=1), then completed
    assert slurm.requeues() == [f"requeue {slurm.job_id}"]
    assert "training failed with exit code" in log and "failure 1 of at most 1 requeued" in log
    resumed = [line for line in log.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and "checkpoints/step_" in resumed[0]
    # Steps after the last checkpoint ran twice (before the kill and after the restart): same losses both times.
    assert_same_losses(slurm.run_dir, reference)


@pytest.mark.slow
def test_single_gpu_debug_script_runs_and_passes_the_trainer_exit_code(tiny_model_dir, tmp_path):
    """The debug run and a normal run (DEBUG=0) of the script, at once: each is one process, and there are 2 cores."""
    script = str(LAUNCH / "single_gpu_debug.sh")
    debug_run = tmp_path / "debug"
    with (tmp_path / "debug.log").open("w") as debug_log:
        debug = subprocess.Popen([script, *train_args(tiny_model_dir, "--train.output_dir", str(debug_run))],
                                 env=base_env(), stdout=subprocess.DEVNULL, stderr=debug_log)

    # DEBUG=0: a normal run; `exec` makes the script the trainer, so a USR1 to it is a handled preemption (124).
    run = tmp_path / "full"
    env = dict(base_env(), DEBUG="0")
    args = train_args(tiny_model_dir, "--train.output_dir", str(run), "--train.max_steps", "200")
    with (tmp_path / "full.log").open("w") as full_log:
        proc = subprocess.Popen([script, *args], env=env, stdout=subprocess.DEVNULL, stderr=full_log)
    try:
        wait_for(lambda: len(loss_records(run)) >= 2, "step 2", proc=proc)
        proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=TIMEOUT_S)
        debug.wait(timeout=TIMEOUT_S)
    finally:
        for p in (debug, proc):
            if p.poll() is None:
                p.kill()
    stderr = (tmp_path / "full.log").read_text(errors="replace")
    assert proc.returncode == 124, stderr[-5000:]
    step = loss_records(run)[-1]["step"]
    assert (run / "checkpoints" / f"step_{step}" / "complete.json").is_file()

    stderr = (tmp_path / "debug.log").read_text(errors="replace")
    assert debug.returncode == 0, stderr[-5000:]
    assert [r["step"] for r in loss_records(debug_run)] == [1, 2, 3]  # --debug: 3 steps
    assert "shapes" in stderr  # --debug logs the tensor shapes of every step


# ------------------------------------------------------------------------- every launch synchronises or refuses
# Without ACCELERATE_USE_CPU, on a machine without a GPU: the runs below used to train each rank on its own gradients
# (Accelerate's distributed type NO, no DDP) while looking healthy. 2 ranks x 4 triplets must now log, step for
# step, the loss and the gradient norm of one process holding all 8. A bare `torchrun` and DeepSpeed through the
# environment (ACCELERATE_USE_DEEPSPEED, torchrun) are the `ddp` and `zero*` layouts of tests/conftest.py: the layout
# parity tests of tests/test_train.py hold them to one process step for step, and tests/test_resume.py shows the zero2
# layout writes ZeRO-2 shards.

SYNC_STEPS = 4


def sync_args(model_dir: Path, batch_size: int, *extra: str) -> list[str]:
    # fp32 guide and dropout 0: the layouts then compare to float noise; the training split alone: no evaluation.
    return ["--model.name", str(model_dir), "--guide.name", str(model_dir), "--guide.dtype", "fp32",
            "--model.dropout", "0.0", "--data.path", str(sample_data_path("train")), "--train.batch_size",
            str(batch_size), "--train.max_steps", str(SYNC_STEPS), "--train.log_every", "1", *extra]


def plain_env() -> dict[str, str]:
    """`base_env` without ACCELERATE_USE_CPU: what a user's shell gives a launcher."""
    env = base_env()
    del env["ACCELERATE_USE_CPU"]
    return env


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory) -> list[tuple[float, float]]:
    """(loss, grad norm) per step of one process with the whole global batch of 8."""
    from gist_scale.train import main

    run_dir = tmp_path_factory.mktemp("one-process") / "run"
    assert main(sync_args(tiny_model_dir, 8, "--train.output_dir", str(run_dir))) == 0
    return [(r["loss"], r["grad_norm"]) for r in loss_records(run_dir)]


def assert_in_sync(result: subprocess.CompletedProcess, run_dir: Path, one_process) -> None:
    """The launched job exited 0 as one group of 2 and logged one process's losses and gradient norms."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "world size 2" in result.stderr
    records = loss_records(run_dir)
    assert [r["step"] for r in records] == list(range(1, SYNC_STEPS + 1))
    for record, (loss, grad_norm) in zip(records, one_process):
        assert record["loss"] == pytest.approx(loss, abs=1e-5), record["step"]
        assert record["grad_norm"] == pytest.approx(grad_norm, rel=1e-5), record["step"]


def launch(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.mark.slow
def test_accelerate_launch_multi_gpu_on_cpu_trains_in_sync(tiny_model_dir, one_process, tmp_path):
    run_dir = tmp_path / "run"
    result = launch(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0",
                     "-m", "gist_scale", "train", *sync_args(tiny_model_dir, 4, "--train.output_dir", str(run_dir))],
                    plain_env())
    assert_in_sync(result, run_dir, one_process)


@pytest.mark.slow
def test_local_multi_gpu_script_on_cpu_trains_in_sync(tiny_model_dir, one_process, tmp_path):
    run_dir = tmp_path / "run"
    result = launch([str(LAUNCH / "local_multi_gpu.sh"), "--gpus", "2",
                     *sync_args(tiny_model_dir, 4, "--train.output_dir", str(run_dir))], plain_env())
    assert_in_sync(result, run_dir, one_process)


@pytest.mark.slow
def test_accelerate_launch_cpu_with_several_processes_is_refused(tiny_model_dir, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts ONE process (its --cpu starts more only under MPI): that
    process refuses in one line instead of training alone on half the global batch. accelerate's own launcher then
    reports the exit code 2 in a traceback of its own and exits 1."""
    run_dir = tmp_path / "run"
    result = launch(["accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "gist_scale", "train",
                     *sync_args(tiny_model_dir, 4, "--train.output_dir", str(run_dir))], plain_env())
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors == ["error: accelerate launch --cpu started a single process although several were asked for "
                      "(it sets MASTER_ADDR only for --num_processes or --num_machines above 1): its --cpu mode starts "
                      "several processes only under MPI (--mpirun_hostfile). For N CPU processes run `accelerate "
                      "launch --multi_gpu --num_processes N -m gist_scale ...` or `torchrun --nproc_per_node N -m "
                      "gist_scale ...`, which use gloo when there is no GPU; for one process leave --num_processes "
                      "out (and unset MASTER_ADDR)"], output[-3000:]
    assert "returned non-zero exit status 2." in output and result.returncode == 1
    assert not (run_dir / "metrics.jsonl").exists()


UNSYNCHRONISED = textwrap.dedent("""
    # gist-scale as it was before `launch_plan`: a CPU job with cpu=False, which Accelerate calls not distributed.
    import os, sys
    from gist_scale import cli, plan
    from gist_scale.trainer import accelerator

    accelerator.launch_plan = lambda deepspeed=False: plan.LaunchPlan(int(os.environ["WORLD_SIZE"]), False, "gloo")
    sys.exit(cli.run())
""")


@pytest.mark.slow
def test_a_launch_that_accelerate_leaves_unwrapped_is_refused(tiny_model_dir, tmp_path):
    """Any launch path that `launch_plan` gets wrong (here: the old plan, forced) ends after `prepare` with one
    line per rank and exit code 2, not with a run whose ranks each step on their own gradients."""
    script = tmp_path / "unsynchronised.py"
    script.write_text(UNSYNCHRONISED)
    run_dir = tmp_path / "run"
    command = torchrun_command(2, "train", *sync_args(tiny_model_dir, 4, "--train.output_dir", str(run_dir)))
    module = command.index("gist_scale")
    command[module - 1:module + 1] = [str(script)]
    result = launch(command, plain_env())
    # Each rank's refusal is one write, but another rank's progress bar (a carriage return, no newline) may precede it
    # on the same line: find the refusals, not the lines that start with one.
    errors = re.findall(r"error: .*", result.stderr)
    assert errors == 2 * ["error: 2 processes, but Accelerate set up DistributedType.NO, so the student stays a bare "
                          "Embedder (not DDP, not a DeepSpeed engine) and each process would step on its own "
                          "gradients: set ACCELERATE_USE_CPU=1 to run CPU processes over gloo, or launch with a DDP or "
                          "DeepSpeed config (accelerate launch --multi_gpu, or --config_file "
                          "accelerate_configs/multi_gpu.yaml or zero2.yaml)"], result.stderr[-3000:]
    # torchrun reports its workers' codes (2) in a summary of its own and exits 1.
    assert result.stderr.count("exitcode  : 2") == 2 and result.returncode == 1
    assert loss_records(run_dir) == []


# The decision itself, on machines with and without an accelerator (availability patched).

NO_LAUNCHER = ("WORLD_SIZE", "ACCELERATE_USE_CPU", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DYNAMO_BACKEND",
               "MASTER_ADDR", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


@pytest.fixture
def machine(monkeypatch):
    """`machine(device, **env)`: this process sees accelerator `device` ("cuda", "mps" or None) and only `env` of
    the variables a launcher sets."""
    def make(device: str | None, **env: str) -> None:
        for name in NO_LAUNCHER:
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        found = None if device is None else torch.device(device)
        monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: found)

    return make


@pytest.mark.parametrize(("device", "env", "deepspeed", "expected"), [
    # One process: no group, no backend; Accelerate picks the GPU when there is one.
    ("cuda", {}, True, (1, False, None)),
    (None, {}, True, (1, False, None)),
    (None, {"ACCELERATE_USE_CPU": "True", "ACCELERATE_DYNAMO_BACKEND": "NO"}, True, (1, False, None)),
    # GPUs: nccl, as always; DeepSpeed sets itself up on it.
    ("cuda", {"WORLD_SIZE": "2"}, True, (2, False, "nccl")),
    ("cuda", {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"}, True, (2, False, "nccl")),
    # No accelerator: Accelerate's CPU mode (DDP over gloo), whether ACCELERATE_USE_CPU says so or not...
    (None, {"WORLD_SIZE": "2"}, True, (2, True, "gloo")),
    (None, {"WORLD_SIZE": "2", "ACCELERATE_USE_CPU": "1"}, True, (2, True, "gloo")),
    # ... except for DeepSpeed, which Accelerate runs only with cpu=False (its group is gloo); not for PartialState.
    (None, {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"}, True, (2, False, "gloo")),
    (None, {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"}, False, (2, True, "gloo")),
    # ACCELERATE_USE_CPU=1 on a GPU machine: Accelerate runs on the CPU, so the group must be gloo, not nccl.
    ("cuda", {"WORLD_SIZE": "2", "ACCELERATE_USE_CPU": "1"}, True, (2, True, "gloo")),
    # An accelerator without a distributed backend keeps cpu=False: `require_synchronised` refuses what follows.
    ("mps", {"WORLD_SIZE": "2"}, True, (2, False, "gloo")),
    # One process started by torchrun (also inside accelerate launch, e.g. the SLURM script requeued onto 1 node).
    (None, {"WORLD_SIZE": "1", "ACCELERATE_USE_CPU": "1", "ACCELERATE_DYNAMO_BACKEND": "NO",
            "MASTER_ADDR": "localhost"}, True, (1, False, None)),
    # accelerate launch --cpu under MPI: Accelerate forms the group from the MPI variables itself.
    (None, {"ACCELERATE_USE_CPU": "True", "ACCELERATE_DYNAMO_BACKEND": "NO", "MASTER_ADDR": "127.0.0.1",
            "PMI_SIZE": "2"}, True, (1, False, None)),
])
def test_launch_plan(machine, device, env, deepspeed, expected):
    machine(device, **env)
    assert plan.launch_plan(deepspeed=deepspeed) == plan.LaunchPlan(*expected)


def test_launch_plan_refuses_accelerate_launch_cpu_with_several_processes(machine):
    # What `accelerate launch --cpu --num_processes 2` gives its one process (with 1 process: no MASTER_ADDR).
    machine(None, ACCELERATE_USE_CPU="True", ACCELERATE_DYNAMO_BACKEND="NO", MASTER_ADDR="127.0.0.1")
    with pytest.raises(ConfigError, match="accelerate launch --cpu started a single process"):
        plan.launch_plan()


def test_launch_plan_refuses_deepspeed_that_cpu_mode_would_drop(machine):
    # `ACCELERATE_USE_CPU=1 launch/local_multi_gpu.sh --zero 2`: Accelerate would train plain DDP, without ZeRO.
    machine(None, WORLD_SIZE="2", ACCELERATE_USE_CPU="1", ACCELERATE_USE_DEEPSPEED="true")
    with pytest.raises(ConfigError, match="^ACCELERATE_USE_DEEPSPEED=true and ACCELERATE_USE_CPU=1: in CPU mode "
                                          "Accelerate drops DeepSpeed"):
        plan.launch_plan(deepspeed=True)
    assert plan.launch_plan(deepspeed=False) == plan.LaunchPlan(2, True, "gloo")  # cache-guide etc.


def test_an_unwrapped_model_of_several_processes_is_refused():
    model = torch.nn.Linear(2, 2)
    distributed.require_synchronised(model, 1, "DistributedType.NO")  # one process: nothing to synchronise
    with pytest.raises(ConfigError, match=r"^2 processes, but Accelerate set up DistributedType.NO, so the student "
                                          r"stays a bare Linear \(not DDP, not a DeepSpeed engine\)"):
        distributed.require_synchronised(model, 2, "DistributedType.NO")


def test_launch_state_refuses_a_job_accelerate_does_not_call_distributed(machine, monkeypatch):
    """cache-guide, mine and eval (PartialState): barriers that do nothing would let ranks race."""
    import accelerate

    class NotDistributed:
        def __init__(self, cpu: bool = False, backend: str | None = None, **kwargs) -> None:
            self.use_distributed, self.distributed_type = False, "DistributedType.NO"

    machine("mps", WORLD_SIZE="2")
    monkeypatch.setattr(accelerate, "PartialState", NotDistributed)
    with pytest.raises(ConfigError, match="^2 processes, but Accelerate set up DistributedType.NO, so its barriers "
                                          "would do nothing: set ACCELERATE_USE_CPU=1"):
        distributed.launch_state()
