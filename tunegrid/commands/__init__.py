"""CLI commands: every module here defines `register(subparsers)`; `shared.cli` discovers them."""
