"""Support code for the tests and the benchmarks: tiny randomly-initialised guard models of the
real architectures, and transformers patched as the fast engine's reference.

Not part of the product: `pyproject.toml` installs only `gateway`, `guards` and `model`, and the
images copy only those. The tests import it from the repository root (pytest's rootdir); the
benchmarks put the repository root on `sys.path` themselves.
"""
