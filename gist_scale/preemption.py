"""Turn SIGUSR1/SIGTERM into a flag the training loop polls at step boundaries.

SLURM sends SIGUSR1 (`#SBATCH --signal=B:USR1@120`) or SIGTERM before it preempts a job. Stopping mid-step would
leave ranks in different collectives, so the handler only records the request, as host state the step reads without
touching the device; the loop finishes the current step, agrees across ranks that someone was signalled
(`distributed.agree_on_step`, in the same collective as the step's other decision), saves a complete checkpoint and
exits with `EXIT_PREEMPTED`, which the batch script answers with a requeue.
"""

from __future__ import annotations

import signal
import threading

EXIT_PREEMPTED = 124
"""Exit code after a handled preemption signal, once the checkpoint is complete."""


class PreemptionFlag:
    """Set by SIGUSR1/SIGTERM; handlers are installed only in the main thread, restored by `uninstall`."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.is_set = False
        """A signal arrived: the loop stops after the current step."""
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        self.is_set = True
