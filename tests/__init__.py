"""The remix test suite (a package so mypy and pytest agree on module names)."""
