"""`python -m batcher.cli`: the command line."""

from . import main

main()
