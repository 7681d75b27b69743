"""A real single-node Slurm for the session (see ``slurm_cluster.py``)."""

from __future__ import annotations

import os

import pytest

from tests.launch.slurm_cluster import LocalSlurm, SlurmUnavailable


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """Start munged + slurmctld + slurmd; stop them at the end of the session.

    When Slurm cannot start the tests fail with the reason; outside CI, set ``MTL_SKIP_SLURM=1``
    to skip them instead (``.ci/run`` installs the packages with ``launch/slurm_local.sh``).
    """
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmUnavailable as err:
        cluster.stop()
        if os.environ.get("MTL_SKIP_SLURM") == "1":
            pytest.skip(f"Slurm unavailable (MTL_SKIP_SLURM=1): {err}")
        pytest.fail(f"could not start a local Slurm: {err}", pytrace=False)
    yield cluster
    cluster.stop()
