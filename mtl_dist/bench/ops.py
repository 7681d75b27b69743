"""Moved to :mod:`mtl_dist.tools.bench.ops`; this path stays as an alias for one release."""

import sys

from mtl_dist.tools.bench import ops as _moved

if __name__ == "__main__":
    _moved.main()
else:
    sys.modules[__name__] = _moved
