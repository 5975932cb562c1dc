"""Runtime: errors, atomic files, logging, processes (distributed, preemption), XLA options,
shardings and checkpoints. Imports nothing else of first_jax."""
