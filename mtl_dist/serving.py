"""Moved to :mod:`mtl_dist.serve.program`; this path stays as an alias for one release."""

import sys

from mtl_dist.serve import program as _moved

sys.modules[__name__] = _moved
