"""`python -m first_jax.extract`: the extract stage (first_jax/stages/extract.py)."""
from first_jax import cli

if __name__ == "__main__":
  raise SystemExit(cli.run_stage("extract"))
