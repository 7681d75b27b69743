"""Moved to :mod:`mtl_dist.observe.profiling`; this path stays as an alias for one release."""

import sys

from mtl_dist.observe import profiling as _moved

sys.modules[__name__] = _moved
