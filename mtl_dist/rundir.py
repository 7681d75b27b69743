"""Moved to :mod:`mtl_dist.checkpoint.rundir`; this path stays as an alias for one release."""

import sys

from mtl_dist.checkpoint import rundir as _moved

sys.modules[__name__] = _moved
