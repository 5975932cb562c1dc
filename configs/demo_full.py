"""The demo at the size whose numbers docs/results.md reports: configs/multiemo.py with `full=1`.

    python -m first_jax.pipeline --config configs/demo_full.py:seed=0   # and seed=1, seed=2
    python bench/report.py --runs workdir/demo_full/seed{0,1,2} --title "demo_full (3 seeds)"
"""
import os

from first_jax import config as config_lib

# the first study's data (BIG-bench multiemo, from a local copy since PyPI stopped serving it)
_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiemo.py")


def get_config(arg: str = ""):
  return config_lib.load_file(_DEMO + ":" + ",".join(["full=1"] + [a for a in arg.split(",") if a]))
