"""`python -m medsclean`: the same command line as the `medsclean` script."""

from .cli import main

main()
