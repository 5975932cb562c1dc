"""`python -m first_jax.config --markdown`: regenerate docs/config.md from `SCHEMA`."""
import sys

from first_jax.config import reference

raise SystemExit(reference.main(sys.argv[1:]))
