"""Entry points that wire pipeline stages into jobs (memorize, evaluate, ...) and the `memorag` CLI."""
