"""`python -m first_jax.evaluate`: the evaluate stage (first_jax/stages/evaluate.py)."""
from first_jax import cli

if __name__ == "__main__":
  raise SystemExit(cli.run_stage("evaluate"))
