"""`python -m first_jax.sample`: the sample stage (first_jax/stages/sample.py)."""
from first_jax import cli

if __name__ == "__main__":
  raise SystemExit(cli.run_stage("sample"))
