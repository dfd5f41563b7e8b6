"""`python -m medhybrid` (and `torchrun -m medhybrid`) enter the CLI."""

from medhybrid.cli import main

if __name__ == "__main__":
    main()
