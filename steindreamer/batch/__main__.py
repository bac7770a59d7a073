"""`python -m steindreamer.batch ...`: the `batch` command without the CLI."""
import sys

# The package, not this __main__, holds what Ray ships to its workers (by reference, not by value).
from steindreamer.batch import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(sys.argv[1:]))
