"""``python -m models.bench``: see :mod:`models.bench`."""

from models.bench.cli import main

if __name__ == "__main__":
    main()
