"""`python -m first_jax.pipeline`: the pipeline stage (first_jax/stages/pipeline.py)."""
from first_jax import cli

if __name__ == "__main__":
  raise SystemExit(cli.run_stage("pipeline"))
