"""One way to reach Ray: a cluster address from config, or a local instance started once."""
from __future__ import annotations

import os

from a3gr.config import PipelineConfig


def ensure_ray(cfg: PipelineConfig) -> None:
    """Connect to cfg.tokenize.ray_address (or RAY_ADDRESS), else start a local Ray; idempotent."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.tokenize.ray_address or os.environ.get("RAY_ADDRESS") or None
    # Workers import our packages from the installed distribution (locally the editable install).
    kwargs = dict(include_dashboard=False, log_to_driver=True, configure_logging=True, logging_level="WARNING")
    if address is None:
        ray.init(num_cpus=os.cpu_count(), **kwargs)
    else:
        ray.init(address=address, **kwargs)
