"""`ray job submit --working-dir .` entrypoints: `python -m jobs.merge CONFIG --out DIR`."""
