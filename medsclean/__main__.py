"""`python -m medsclean`: the same command line as the `medsclean` script."""

from medsclean.cli import main

main()
