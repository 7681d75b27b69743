"""Applications on top of the library: compare heads, task relations, the sharding planner's
report, Slurm submission, attribution of an exported model, and ``bench/``.

May import every stage; nothing in the library imports tools.
"""
