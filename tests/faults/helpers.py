"""What the fault tests share: a tiny synthetic config, table contents without run ids, the full-disk writer."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pandas as pd

from a3gr.catalog import spec
from a3gr.config import PipelineConfig, load_config
from a3gr.lake import Lake
from a3gr.spark_delta import DeltaRsDataSource, _DeltaRsWriter

ROOT = Path(__file__).resolve().parents[2]
PRESET = str(ROOT / "configs" / "embedded.yaml")
# 80 users x 40 items: every ETL table is non-empty after the 5-core filter, and a stage takes seconds.
TINY = ["source.synthetic.n_users=80", "source.synthetic.n_items=40", "spark.shuffle_partitions=2"]


def tiny_config(root: str | Path, *extra: str) -> PipelineConfig:
    return load_config(PRESET, [f"lake.root={root}", *TINY, *extra])


def cli_args(root: str | Path, *extra: str) -> list[str]:
    """`-c PRESET --set ...` for the same config as tiny_config, on the command line."""
    args = ["-c", PRESET]
    for item in [f"lake.root={root}", *TINY, *extra]:
        args += ["--set", item]
    return args


def _cell(value):
    return tuple(_cell(v) for v in value) if isinstance(value, (list, np.ndarray)) else value


def table_contents(lake: Lake, table: str) -> pd.DataFrame:
    """A table's rows without the columns that name the run that wrote them, in key order."""
    frame = lake.read_pandas(table)
    frame = frame.drop(columns=[c for c in frame.columns if c.endswith("run_id")])
    frame = frame.apply(lambda col: col.map(_cell) if col.dtype == object else col)
    keys = [k for k in spec(table).keys if k in frame.columns] or list(frame.columns)
    return frame.sort_values(keys).reset_index(drop=True)


class _FullDiskWriter(_DeltaRsWriter):
    """Writes a task's first batch to its Parquet file, then finds the disk full."""

    def write(self, iterator):
        def until_full():
            batches = iter(iterator)
            first = next(batches, None)
            if first is not None:
                yield first
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.table_uri)

        return super().write(until_full())


class FullDiskDataSource(DeltaRsDataSource):
    """`a3gr_delta` on a disk that fills up in the middle of every task's write."""

    def writer(self, schema, overwrite: bool):
        return _FullDiskWriter(self.options, overwrite)
