"""Distillation stage placeholder (filled by the pipeline issue)."""
from first_jax import cli


def run(cfg):
  raise NotImplementedError


if __name__ == "__main__":
  raise SystemExit(cli.stage_main(run))
