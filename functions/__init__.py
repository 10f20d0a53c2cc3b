"""One blueprint per trigger. Each turns its trigger payload into plain values, calls one use case in
`shared/`, and maps the outcome (HTTP status, or re-raise so the platform retries)."""
