"""`python -m first_jax.calibrate`: the calibrate stage (first_jax/stages/calibrate.py)."""
from first_jax import cli

if __name__ == "__main__":
  raise SystemExit(cli.run_stage("calibrate"))
