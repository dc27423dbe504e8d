"""``python -m models.bench``: see :mod:`models.bench`."""

from normport.models.bench.cli import main

if __name__ == "__main__":
    main()
