"""Small data committed with the package (see README.md here): the README job's default."""
from pathlib import Path

VADER = Path(__file__).with_name("vader_hutto_icwsm2014.tar.xz")
