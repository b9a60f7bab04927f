"""`python -m mmagg`: the same command as `mmagg`."""

from mmagg.cli import main

if __name__ == "__main__":
    main()
