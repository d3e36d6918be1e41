"""The fault-injection soak (bench/soak.py), short: 20 iterations across runv, containerd's
shim, hyperctl and the API, each with a random process of its sandbox SIGKILLed or SIGSTOPped
at a random moment; every iteration must end with the truth reported and nothing left.
The seed is fixed so that a failure names an iteration that can be run again
(`python bench/soak.py --seed 20261206 --iterations N`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from bench import soak

SEED = 20261206


def test_twenty_iterations_leave_nothing_and_tell_the_truth(assets_dir: Path) -> None:
    env = dict(os.environ, RUNV_ASSETS_DIR=str(assets_dir))
    result = soak.soak(20, SEED, ["runv", "shim", "hyperctl", "api"], env=env)
    assert result["iterations"] == 20
    assert result["failed_iterations"] == 0, json.dumps(result["failures"], indent=1)
    shutil.rmtree(result["roots"], ignore_errors=True)
