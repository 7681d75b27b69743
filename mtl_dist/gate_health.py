"""Moved to :mod:`mtl_dist.observe.gate_health`; this path stays as an alias for one release."""

import sys

from mtl_dist.observe import gate_health as _moved

sys.modules[__name__] = _moved
