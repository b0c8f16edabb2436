"""`ray job submit` entrypoints (installed with the package; `jobs/` at the repository root wraps them)."""
