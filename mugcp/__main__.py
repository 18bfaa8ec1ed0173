"""`python -m mugcp ...` is the `mugcp` command."""

from mugcp.cli import main

main()
