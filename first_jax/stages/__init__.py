"""The stages: finetune -> extract -> calibrate -> train -> evaluate, and the pipeline that
runs them. Each is `python -m first_jax.<stage>`."""
