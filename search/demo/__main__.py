"""``python -m search.demo``: builds the demo models (see :mod:`search.demo.build`)."""

from search.demo.build import main

if __name__ == "__main__":
    raise SystemExit(main())
