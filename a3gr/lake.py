"""Lake I/O through delta-rs: atomic writes that enforce the catalog schema, time travel, merge.

Every write is one Delta transaction, so a reader sees the previous version or the new one,
never a half-written table. Tables stay at protocol (1,2): UTC timestamps only, no deletion
vectors, no column mapping, so any Delta reader (delta-spark included) can open them.
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from datetime import date
from typing import Iterable

import pandas as pd
import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError, TableNotFoundError

from a3gr.catalog import spec, table_uri


class SchemaMismatchError(ValueError):
    """Data that does not match the catalog schema of the table it is written to."""


class MissingTableError(FileNotFoundError):
    """A table that a job reads has never been written."""


def storage_options_from_env(mapping: dict[str, str]) -> dict[str, str]:
    """Object-store options whose values come from the environment (never from config files)."""
    out = {}
    for option, env_var in mapping.items():
        if env_var not in os.environ:
            raise KeyError(f"storage option '{option}' needs environment variable {env_var}, which is not set")
        out[option] = os.environ[env_var]
    return out


def conform_arrow(data: pa.Table | pa.RecordBatch, schema: pa.Schema, table: str) -> pa.Table:
    """Select and cast columns to the table schema; name the column that does not fit."""
    names = set(data.schema.names)
    missing = [f.name for f in schema if f.name not in names]
    extra = sorted(names - set(schema.names))
    if missing or extra:
        raise SchemaMismatchError(f"table '{table}': missing columns {missing}, unexpected columns {extra}")
    columns = []
    for f in schema:
        col = data.column(f.name)
        if not f.nullable and col.null_count:
            raise SchemaMismatchError(f"table '{table}': column '{f.name}' is not nullable but has {col.null_count} nulls")
        if col.type != f.type:
            try:
                col = col.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise SchemaMismatchError(
                    f"table '{table}': column '{f.name}' has type {col.type}, expected {f.type}: {exc}") from None
        columns.append(col)
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([pa.RecordBatch.from_arrays(columns, schema=schema)])
    return pa.Table.from_arrays(columns, schema=schema)


def retry_on_conflict(fn, attempts: int = 8, what: str = "commit"):
    """Run a whole read-modify-write again when a concurrent writer committed first."""
    for attempt in range(attempts):
        try:
            return fn()
        except CommitFailedError:
            if attempt == attempts - 1:
                raise
            time.sleep(min(2.0, 0.05 * 2 ** attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


@dataclass
class Lake:
    root: str
    # {delta-rs storage option: environment variable}; values are resolved on use, never stored.
    storage_options_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg) -> "Lake":
        return cls(cfg.lake.root, dict(cfg.lake.storage_options_env))

    @property
    def storage_options(self) -> dict[str, str] | None:
        return storage_options_from_env(self.storage_options_env) or None

    def uri(self, table: str) -> str:
        return table_uri(self.root, table)

    def exists(self, table: str) -> bool:
        return DeltaTable.is_deltatable(self.uri(table), storage_options=self.storage_options)

    def table(self, table: str, version: int | None = None) -> DeltaTable:
        try:
            return DeltaTable(self.uri(table), version=version, storage_options=self.storage_options)
        except TableNotFoundError:
            raise MissingTableError(f"table '{table}' does not exist at {self.uri(table)}; "
                                    f"run the job that writes it first") from None

    def version(self, table: str) -> int | None:
        return self.table(table).version() if self.exists(table) else None

    def versions(self, tables: Iterable[str]) -> dict[str, int | None]:
        return {t: self.version(t) for t in tables}

    def read_arrow(self, table: str, version: int | None = None, columns: list[str] | None = None) -> pa.Table:
        return self.table(table, version).to_pyarrow_table(columns=columns)

    def read_pandas(self, table: str, version: int | None = None, columns: list[str] | None = None) -> pd.DataFrame:
        return self.read_arrow(table, version, columns).to_pandas()

    def write_arrow(self, table: str, data: pa.Table | pd.DataFrame, mode: str = "overwrite",
                    run_id: str | None = None) -> int:
        """Write a whole table (overwrite) or append to it in one transaction; returns the new version."""
        s = spec(table)
        if isinstance(data, pd.DataFrame):
            data = pa.Table.from_pandas(data, preserve_index=False)
        data = conform_arrow(data, s.schema, table)
        write_deltalake(self.uri(table), data, mode=mode, partition_by=list(s.partition_by) or None,
                        storage_options=self.storage_options,
                        commit_properties=CommitProperties(custom_metadata={"run_id": run_id or ""}))
        return self.table(table).version()

    def replace_partition(self, table: str, data: pa.Table | pd.DataFrame, partition: dict,
                          run_id: str | None = None) -> int:
        """Replace one partition (e.g. {"run_date": date(2024, 1, 2)}) in one transaction; returns the new version.

        Readers see the old partition or the new one, never a mix; other partitions are untouched.
        Values are validated and formatted here (dates as ISO dates, integers as integers), so the
        predicate never holds untrusted text. Every row of `data` must lie in the partition.
        """
        s = spec(table)
        if sorted(partition) != sorted(s.partition_by) or not partition:
            raise ValueError(f"table '{table}': replace_partition needs a value for each partition column "
                             f"{list(s.partition_by)}, got {sorted(partition)}")
        terms = []
        for column, value in partition.items():
            kind = s.schema.field(column).type
            if pa.types.is_date(kind):
                value = value if type(value) is date else date.fromisoformat(str(value))
                terms.append(f"{column} = '{value.isoformat()}'")
            elif pa.types.is_integer(kind) and isinstance(value, int) and not isinstance(value, bool):
                terms.append(f"{column} = {int(value)}")
            else:
                raise TypeError(f"table '{table}': partition column '{column}' ({kind}) cannot be replaced by "
                                f"value {value!r}; date and integer partitions are supported")
        if isinstance(data, pd.DataFrame):
            data = pa.Table.from_pandas(data, preserve_index=False)
        data = conform_arrow(data, s.schema, table)
        if not self.exists(table):
            return self.write_arrow(table, data, mode="overwrite", run_id=run_id)

        def attempt():
            write_deltalake(self.uri(table), data, mode="overwrite", predicate=" AND ".join(terms),
                            partition_by=list(s.partition_by), storage_options=self.storage_options,
                            commit_properties=CommitProperties(custom_metadata={"run_id": run_id or ""}))
            return self.table(table).version()

        return retry_on_conflict(attempt)

    def merge(self, table: str, data: pa.Table | pd.DataFrame, on: tuple[str, ...] | None = None,
              run_id: str | None = None) -> int:
        """Upsert rows by key (the table's keys by default), retrying on concurrent commits."""
        s = spec(table)
        keys = on or s.keys
        if isinstance(data, pd.DataFrame):
            data = pa.Table.from_pandas(data, preserve_index=False)
        data = conform_arrow(data, s.schema, table)
        if not self.exists(table):
            return self.write_arrow(table, data, mode="overwrite", run_id=run_id)
        # Column names come from the catalog, never from data, so the predicate holds no data values.
        predicate = " AND ".join(f"t.{k} = s.{k}" for k in keys)

        def attempt():
            (self.table(table)
             .merge(data, predicate=predicate, source_alias="s", target_alias="t",
                    commit_properties=CommitProperties(custom_metadata={"run_id": run_id or ""}))
             .when_matched_update_all().when_not_matched_insert_all().execute())
            return self.table(table).version()

        return retry_on_conflict(attempt)

    def protocol(self, table: str) -> tuple[int, int]:
        p = self.table(table).protocol()
        return p.min_reader_version, p.min_writer_version
