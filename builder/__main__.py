"""`python -m builder`: the `serverless-triton` command."""

from builder.cli import main

main(prog_name="serverless-triton")
