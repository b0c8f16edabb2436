"""`python -m jobs.merge CONFIG --out DIR [--workers K]`: the working-dir form of `aim_ray.jobs.merge`.

`ray job submit --working-dir .` puts the repository root on sys.path, so both `jobs` and `aim_ray` import
from the uploaded copy, whether or not the package is installed on the cluster.
"""

import sys

from aim_ray.jobs.merge import main

if __name__ == "__main__":
    sys.exit(main())
