"""A crash on demand, to check that rerunning an interrupted training command resumes it exactly.

    python examples/mtbi_train.py ... exp_manager.checkpoint_callback_params.every_n_train_steps=2 \\
        '+trainer.callbacks=[{_target_: nemo_speechlm.parts.preemption.ExitAfterStep, step: 3}]'

ends the process with ``os._exit`` (no cleanup, no checkpoint: like a killed job) once step 3 is done;
the last checkpoint is the one from step 2. Rerunning the same command resumes from it and is not
killed again (the callback only fires in a run that started from step 0).
"""
from __future__ import annotations

import os

from lightning.pytorch import Callback


class ExitAfterStep(Callback):
    def __init__(self, step: int, exit_code: int = 75) -> None:
        self.step, self.exit_code = step, exit_code
        self.started_at: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.started_at = trainer.global_step

    def on_train_batch_end(self, trainer, *args) -> None:
        # Lightning runs ModelCheckpoint after other callbacks: a checkpoint due at this step is not written.
        if self.started_at == 0 and trainer.global_step >= self.step:
            print(f"ExitAfterStep: killing the process after step {trainer.global_step}", flush=True)
            os._exit(self.exit_code)
