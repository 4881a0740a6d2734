"""Session-wide fixtures: one Spark session and one lake root per test run."""
from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def spark():
    from a3gr.config import PipelineConfig
    from a3gr.spark import get_spark

    cfg = PipelineConfig()
    cfg.spark.master = "local[2]"
    cfg.spark.shuffle_partitions = 2
    session = get_spark(cfg, app_name="align3gr-tests")
    yield session
    session.stop()


@pytest.fixture
def lake_root(tmp_path) -> str:
    return str(tmp_path / "lake")


def shared_data(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available at {path}")
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test run."""
    import ray

    from a3gr.config import PipelineConfig
    from a3gr.ray_util import ensure_ray

    ensure_ray(PipelineConfig())
    yield ray
    ray.shutdown()
