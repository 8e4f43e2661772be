"""Every check of a manifest before money is spent, each mistake found by one check.

- `structure`: the document's shape pydantic cannot see (ids, duplicates, unknown or
  reserved parameter names, matrix paths). Owns unknown keys: the wire check below
  ignores ``extra_forbidden``.
- `tasks`: every expanded task against the wire models (once per parameter set), the
  prompts (parsed once, filled per task) and the reference strings.
- `files`: local image files, opened once per distinct path.
- `check`: runs them in that order: `check_manifest` and `validate_manifest`.

`pipeline.manifest` reads and parses (TOML, CSV/JSONL lists, pydantic types) and calls
`structure` from `load_manifest`. This package imports nothing at load time, so that
`manifest` can use `structure` and `problems` without an import cycle.
"""
