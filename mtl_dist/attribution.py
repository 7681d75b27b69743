"""Moved to :mod:`mtl_dist.observe.attribution`; this path stays as an alias for one release."""

import sys

from mtl_dist.observe import attribution as _moved
from mtl_dist.tools import attribution as _cli

if __name__ == "__main__":
    _cli.main()
else:
    sys.modules[__name__] = _moved
