"""Moved to :mod:`mtl_dist.tools.relations`; this path stays as an alias for one release."""

import sys

from mtl_dist.tools import relations as _moved

sys.modules[__name__] = _moved
