"""CLI commands: every module here defines `register(subparsers)`; `tunegrid.cli` discovers them."""
