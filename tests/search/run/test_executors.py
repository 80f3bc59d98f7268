"""The Ray executor sizes its pool from the cluster and refuses a pool that cannot start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from search.config import ParallelConfig
from search.errors import SoupError
from search.run.executors import RayExecutor, _ray_temp_dir


@pytest.fixture
def local_ray(tmp_path: Path) -> Any:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=_ray_temp_dir(tmp_path))  # short: socket paths
    yield ray
    ray.shutdown()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without GPUs")
def test_one_worker_per_gpu_without_gpus_is_refused(local_ray: Any, tmp_path: Path) -> None:
    """workers=0 with a GPU per worker on a CPU-only cluster: one line, no endless wait
    (Ray would keep the actor pending forever)."""
    cfg = ParallelConfig(kind="ray", workers=0, cpus_per_worker=1.0, gpus_per_worker=1.0)
    with pytest.raises(SoupError, match=r"which has 2 CPU, 0 GPU: no worker fits .*"
                                        r"parallel\.gpus_per_worker=null"):
        RayExecutor(None, cfg, tmp_path)  # type: ignore[arg-type]
    two = ParallelConfig(kind="ray", workers=2, cpus_per_worker=1.0, gpus_per_worker=1.0)
    with pytest.raises(SoupError, match=r"needs 2 GPUs; this machine has 0"):
        RayExecutor(None, two, tmp_path)  # type: ignore[arg-type]
    cpus = ParallelConfig(kind="ray", workers=0, cpus_per_worker=4.0, gpus_per_worker=None)
    with pytest.raises(SoupError, match=r"each needs 4 CPU, 0 GPU"):
        RayExecutor(None, cpus, tmp_path)  # type: ignore[arg-type]
