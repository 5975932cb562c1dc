"""`python -m first_jax.finetune`: the finetune stage (first_jax/stages/finetune.py)."""
from first_jax import cli

if __name__ == "__main__":
  raise SystemExit(cli.run_stage("finetune"))
