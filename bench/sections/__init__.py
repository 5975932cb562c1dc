"""The sections of bench/run.py, one module each (`ctx, settings -> dict`)."""
