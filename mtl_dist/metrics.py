"""Moved to :mod:`mtl_dist.observe.metrics`; this path stays as an alias for one release."""

import sys

from mtl_dist.observe import metrics as _moved

sys.modules[__name__] = _moved
