"""The demo at the size whose numbers docs/results.md reports: configs/demo.py with `full=1`.

    python -m first_jax.pipeline --config configs/demo_full.py:seed=0   # and seed=1, seed=2
    python bench/report.py --runs workdir/demo_full/seed{0,1,2} --title "demo_full (3 seeds)"
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "first_jax_demo_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py"))
_demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_demo)


def get_config(arg: str = ""):
  return _demo.get_config(",".join(["full=1"] + [a for a in arg.split(",") if a]))
