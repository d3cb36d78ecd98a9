"""Fault injection in the tests' subprocesses: Python imports this at start-up when tests/faults is on
PYTHONPATH (tests.conftest.fault_env puts it there), and it hooks sift's named fault points
(sift_megatron.errors.fault_point) as these variables say:
  SIFT_FAULT_KILL_AT=name, or name@step for a point reached at every step: SIGKILL there (a power cut, an OOM kill)
  SIFT_FAULT_SIGINT_AT=name: SIGINT there (a Ctrl-C)
  SIFT_STEP_DELAY_S=seconds: sleep after every training step (time to signal or kill a run mid-way)"""

import os

if any(os.environ.get(k) for k in ("SIFT_FAULT_KILL_AT", "SIFT_FAULT_SIGINT_AT", "SIFT_STEP_DELAY_S")):
    import signal
    import time

    from sift_megatron.errors import FAULT_HOOKS

    def _hook(name: str, step: int | None) -> None:
        if os.environ.get("SIFT_FAULT_KILL_AT") in (name, f"{name}@{step}"):
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get("SIFT_FAULT_SIGINT_AT") == name:
            os.kill(os.getpid(), signal.SIGINT)
        if name == "train_step":
            time.sleep(float(os.environ.get("SIFT_STEP_DELAY_S") or 0))

    FAULT_HOOKS.append(_hook)
