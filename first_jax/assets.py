"""`python -m first_jax.assets --check`: fetch every asset the shipped configs read into the
cache and verify it, one line each (the assets themselves: first_jax/data/assets.py)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from first_jax.data import assets
from first_jax import config as config_lib

log = logging.getLogger(__name__)


def _shipped_configs(folder: Path) -> dict[str, Any]:
  """{file name: its get_config()} for each configs/*.py (a broken one is reported, not
  raised: the check is about assets)."""
  out = {}
  for path in sorted(folder.glob("*.py")):
    try:
      out[path.name] = config_lib.load_file(str(path))
    except Exception as e:  # noqa: BLE001 - reported, the other configs still count
      log.warning("%s: could not be read (%s: %s)", path, type(e).__name__, e)
  return out


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(
      prog="python -m first_jax.assets",
      description="Fetch every asset the shipped configs read into the cache and verify it.")
  ap.add_argument("--check", action="store_true", required=True,
                  help="fetch and verify; one line per asset; exit 1 if any failed")
  ap.add_argument("--only", default="", help="comma-separated asset names (default: all)")
  ap.add_argument("--cache-dir", default=None, help="default: $FIRST_JAX_CACHE or "
                  "~/.cache/first_jax")
  ap.add_argument("--configs", default=str(Path(__file__).resolve().parent.parent / "configs"),
                  help="folder of the shipped configs, to say which config needs which asset")
  args = ap.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(message)s")
  names = [n for n in args.only.split(",") if n] or list(assets.ASSETS)
  unknown = [n for n in names if n not in assets.ASSETS]
  if unknown:
    print(f"error: --only: unknown asset {unknown[0]!r} (expected some of "
          f"{', '.join(assets.ASSETS)})", file=sys.stderr)
    return 2
  users: dict[str, list[str]] = {}
  folder = Path(args.configs)
  for cfg_name, cfg in (_shipped_configs(folder) if folder.is_dir() else {}).items():
    for n in sorted(assets.needed_by(cfg)):
      users.setdefault(n, []).append(cfg_name)
  print(f"cache: {assets.cache_root(args.cache_dir)}")
  failed = assets.check(names, args.cache_dir, users)
  print(f"{len(names) - failed} of {len(names)} assets ok or accounted for"
        + (f"; {failed} failed" if failed else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
