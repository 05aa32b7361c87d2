"""The local SLURM cluster, started once for a test module and stopped after it.

SLURM is installed with apt-get when missing (as root). Where it is absent and cannot be installed
or started (not root, no apt-get, no package index), the tests skip with the reason, so that the
README's test command passes for any user; with LOOPLM_REQUIRE_SLURM=1 (CI sets it) that is a
failure instead, in apt-get's or the daemons' own words: these tests are the proof that the sbatch
scripts work. LOOPLM_SKIP_SLURM=1 skips them outright.
"""

import os
from typing import Optional

import pytest

from tests.slurm.cluster import Cluster, SlurmError, install_slurm

SKIP = os.environ.get("LOOPLM_SKIP_SLURM") == "1"
REQUIRE = os.environ.get("LOOPLM_REQUIRE_SLURM") == "1"


class LocalSlurm:
    """The cluster, or why there is none: `get()`, called in a test's body, fails that test in the
    second case (a fixture that fails makes an error at setup, not a failed test)."""

    def __init__(self, cluster: Optional[Cluster], error: Optional[str]):
        self.cluster, self.error = cluster, error

    def get(self) -> Cluster:
        if self.cluster is None:
            pytest.fail(self.error, pytrace=False)
        return self.cluster


@pytest.fixture(scope="module")
def local_slurm():
    if SKIP:
        pytest.skip("LOOPLM_SKIP_SLURM=1")
    cluster = Cluster()
    try:
        install_slurm()
        cluster.start()
    except SlurmError as e:
        if not REQUIRE:
            pytest.skip(f"no local SLURM cluster (LOOPLM_REQUIRE_SLURM=1 makes this a failure): {e}")
        yield LocalSlurm(None, f"no local SLURM cluster: {e}")
        return
    try:
        yield LocalSlurm(cluster, None)
    finally:
        cluster.stop()
