"""The 1-bit optimizer settings the multi-process tests run (every phase within STEPS steps)."""

import numpy as np

import optax_lamb16

# "z" never gets a gradient: 1-bit Adam (like DeepSpeed's) needs it masked, or sign noise divided by its zero v
# blows it up.
MASK = {"b": np.ones(12, np.float32), "w": np.ones((16, 12), np.float32), "z": np.zeros(5, np.float32)}

STEPS = 20
NAMES_OF_OPTIMIZERS = ("onebit_adam", "zero_one_adam", "onebit_lamb")


def make_optimizer(name, comm):
  if name == "onebit_adam":
    return optax_lamb16.onebit_adam(0.01, comm=comm, freeze_step=6, weight_decay=0.01, momentum_mask=MASK)
  if name == "zero_one_adam":
    return optax_lamb16.zero_one_adam(0.01, comm=comm, var_freeze_step=8, var_update_scaler=2, local_step_scaler=3,
                                      local_step_clipper=4, weight_decay=0.01,
                                      momentum_mask=MASK)
  if name == "onebit_lamb":
    return optax_lamb16.onebit_lamb(0.01, comm=comm, freeze_step=6, weight_decay=0.01)
  raise ValueError(name)
