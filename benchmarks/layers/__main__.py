"""``python -m benchmarks.layers``: see :mod:`benchmarks.layers`."""

from benchmarks.layers.cli import main

if __name__ == "__main__":
    main()
