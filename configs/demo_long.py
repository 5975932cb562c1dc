"""demo_full with students trained 5 epochs instead of 2: does FIRST win once fine-tuning runs long
enough to mis-calibrate the student (the paper's "tuning-induced mis-calibration")?

    bash bench/run_demo_long.sh [SEED ...]   # pipeline per seed, then docs/results_long.md

Same data, teacher (its fingerprint matches demo_full's; the script links a demo_full seed's
data/, teacher/ and store/ in) and student initialisation as demo_full; students sft and first
(add kd with --config.students="('sft','first','kd')") for `epochs` (`:epochs=N`, default 5)
epochs instead of 2: about 12 minutes a student on 2 CPU cores.
"""
import os

from first_jax import config as config_lib

# the first study's data (BIG-bench multiemo, from a local copy since PyPI stopped serving it)
_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiemo.py")


def get_config(arg: str = ""):
  args = dict(kv.split("=") for kv in arg.split(",") if kv)
  epochs = int(args.pop("epochs", 5))
  demo_args = ",".join(["full=1"] + [f"{k}={v}" for k, v in args.items()])
  c = config_lib.load_file(f"{_DEMO}:{demo_args}")
  c.workdir = f"workdir/demo_long/seed{c.seed}"
  c.distill.epochs = epochs
  c.students = ("sft", "first")
  return c
