"""The training step and what runs it: losses (ESMM / ESCM2 included), the step with its
backward, the non-finite guard, loss scaling, optimizers, the LR schedule, best-model selection
and preemption.

May import: config, files, distributed, data, models, balancing (never checkpoint, observe,
serve, train or tools).
"""
