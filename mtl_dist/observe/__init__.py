"""What a run reports: telemetry to TensorBoard (a reporter only), gate health, metrics (AUC,
GAUC, logloss, calibration), feature attribution and step profiles.

May import: config, files, distributed, data, models, balancing, loop, checkpoint (never serve,
train or tools).
"""
