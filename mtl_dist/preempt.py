"""Moved to :mod:`mtl_dist.loop.preempt`; this path stays as an alias for one release."""

import sys

from mtl_dist.loop import preempt as _moved

sys.modules[__name__] = _moved
