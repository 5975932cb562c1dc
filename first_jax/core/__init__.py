"""The numerics of FIRST, pure float32 JAX: top-k, temperature re-scaling and its search,
calibration metrics, the losses and the one train step. Imports only runtime."""
