"""`python -m saliencycheck` runs the command line."""

from saliencycheck.cli import main

main()
