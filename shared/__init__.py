"""Tunegrid's domain: use cases, ports and adapters. Never imports `functions/` or `function_app`."""
