"""The optimizer settings the multi-process and reliability tests run (every phase within STEPS steps)."""

import numpy as np
import optax

import optax_lamb16

# "z" never gets a gradient: 1-bit Adam (like DeepSpeed's) needs it masked, or sign noise divided by its zero v
# blows it up.
MASK = {
  "b": np.ones(12, np.float32),
  "s": np.ones((), np.float32),
  "w": np.ones((16, 12), np.float32),
  "z": np.zeros(5, np.float32),
}

STEPS = 20
NAMES_OF_OPTIMIZERS = ("onebit_adam", "zero_one_adam", "onebit_lamb")


# Every optimizer of the library, for the reliability tests, and the steps where they save a checkpoint: one in
# each phase (1-bit Adam and 1-bit LAMB compress from step index 5; 0/1 Adam freezes v at 7 and then syncs every
# 1, 2, 4 steps, so 14 and 17 fall between syncs).
ALL_OPTIMIZERS = ("lamb16", "lamb16_1bit", *NAMES_OF_OPTIMIZERS)
SAVE_STEPS = {
  "lamb16": (7,),
  "lamb16_1bit": (7,),
  "onebit_adam": (3, 12),
  "zero_one_adam": (4, 11, 14, 17),
  "onebit_lamb": (3, 5, 12),
}


def make_optimizer(name, comm):
  if name == "lamb16":  # exact float32 gradient mean, then LAMB16
    return optax.chain(optax_lamb16.uncompressed_mean(comm), optax_lamb16.lamb16(0.01, weight_decay=0.01))
  if name == "lamb16_1bit":
    return optax.chain(optax_lamb16.compressed_mean(comm), optax_lamb16.lamb16(0.01, weight_decay=0.01))
  if name == "onebit_adam":
    return optax_lamb16.onebit_adam(0.01, comm=comm, freeze_step=6, weight_decay=0.01, momentum_mask=MASK)
  if name == "zero_one_adam":
    return optax_lamb16.zero_one_adam(
      0.01,
      comm=comm,
      var_freeze_step=8,
      var_update_scaler=2,
      local_step_scaler=3,
      local_step_clipper=4,
      weight_decay=0.01,
      momentum_mask=MASK,
    )
  if name == "onebit_lamb":
    return optax_lamb16.onebit_lamb(0.01, comm=comm, freeze_step=6, weight_decay=0.01)
  raise ValueError(name)
