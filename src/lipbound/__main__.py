"""``python -m lipbound``: the command line, the same as the ``lipbound`` script."""

from lipbound.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
