"""The `hotlab` command line: `main` wires one module per sub-command."""
