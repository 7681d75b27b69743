"""Moved to :mod:`mtl_dist.observe.telemetry`; this path stays as an alias for one release."""

import sys

from mtl_dist.observe import telemetry as _moved

sys.modules[__name__] = _moved
