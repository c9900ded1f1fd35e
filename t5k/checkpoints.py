"""Orbax checkpoints of the TrainState: async, keep-last-K, atomic, restorable onto any mesh.

Atomicity comes from Orbax: a step is written to a temporary directory and renamed when complete, so a crash
mid-save leaves the previous checkpoint as the latest restorable one. Restoring takes an *abstract* target
(shapes, dtypes and the shardings of the current mesh), which is how a checkpoint written on a 4×2 mesh is
read onto 1 or 2 devices (HyperCLOVA's "checkpoint merge"), with no conversion step.
"""

import os
from typing import Any, Optional

import gin
import orbax.checkpoint as ocp


@gin.configurable
def checkpoint_manager(directory: str, save_interval_steps: int = 1000, max_to_keep: Optional[int] = 3,
                       async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps, max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
        create=True,
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, force: bool = False) -> bool:
    return manager.save(step, args=ocp.args.StandardSave(state), force=force)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: Optional[int] = None) -> Any:
    """Restores `step` (default: the latest) onto the shardings carried by `abstract_state`."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
