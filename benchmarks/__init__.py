"""normport's benchmarks: run from the repository root (``make bench``), never installed.

- ``python -m benchmarks.startup``: server start to ready and idle RSS (cold, then with the
  probe cache), with targets.
"""
