"""Moved to :mod:`mtl_dist.tools.bench`; these paths stay as aliases for one release."""
