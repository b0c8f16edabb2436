"""`ray job submit` entrypoints: `python -m aim_ray.jobs.merge CONFIG --out DIR`."""
