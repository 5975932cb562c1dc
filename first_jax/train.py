"""`python -m first_jax.train`: the train stage (first_jax/stages/train.py)."""
from first_jax import cli

if __name__ == "__main__":
  raise SystemExit(cli.run_stage("train"))
