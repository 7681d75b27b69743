"""Moved to :mod:`mtl_dist.tools.bench.e2e`; this path stays as an alias for one release."""

import sys

from mtl_dist.tools.bench import e2e as _moved

if __name__ == "__main__":
    _moved.main()
else:
    sys.modules[__name__] = _moved
