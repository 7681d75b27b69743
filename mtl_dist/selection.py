"""Moved to :mod:`mtl_dist.loop.selection`; this path stays as an alias for one release."""

import sys

from mtl_dist.loop import selection as _moved

sys.modules[__name__] = _moved
