"""Delta tables from Spark without the Delta jars: a Spark 4 Python data source over delta-rs.

Write: every task writes Parquet files (schema enforced per batch, since delta-rs' transaction
API does not check file schemas) and returns their `add` actions; the driver commits all of a
job's files in ONE delta-rs transaction. A failed job deletes its files; a killed job leaves
only unreferenced files, which no reader sees. Read: one Spark partition per data file of the
requested version. On a cluster with delta-spark, `lake.engine=delta-spark` uses native
`format("delta")` instead; a given table is always written by one engine.
"""
from __future__ import annotations

import base64
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator
from urllib.parse import quote, unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs as pafs
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.datasource import (DataSource, DataSourceArrowWriter, DataSourceReader, InputPartition,
                                    WriterCommitMessage)
from pyspark.sql.pandas.types import from_arrow_schema

FORMAT = "a3gr_delta"
# Fault-injection hook for the kill-mid-write tests: with A3GR_FAILPOINT=pause_before_delta_commit:<run_id>
# the commit of that run announces itself by creating the file named in A3GR_FAILPOINT_MARKER and then waits, so the
# test can kill the whole job (driver, JVM, workers) after every task has written its files.
FAILPOINT_ENV = "A3GR_FAILPOINT"


def encode_schema(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def decode_schema(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def _filesystem(table_uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in table_uri and not table_uri.startswith("file://"):
        return pafs.FileSystem.from_uri(table_uri)
    path = table_uri.removeprefix("file://")
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _storage_options(options: dict) -> dict | None:
    # Only environment variable NAMES travel in Spark options; values are read where they are used.
    from a3gr.lake import storage_options_from_env

    mapping = json.loads(options.get("storage_options_env", "{}"))
    return storage_options_from_env(mapping) or None


@dataclass
class DeltaFilesMessage(WriterCommitMessage):
    actions: list[dict] = field(default_factory=list)


class _DeltaRsWriter(DataSourceArrowWriter):
    def __init__(self, options: dict, overwrite: bool):
        self.table_uri = options["path"]
        self.table_name = options.get("table", self.table_uri)
        self.schema = decode_schema(options["arrow_schema"])
        self.partition_by = json.loads(options.get("partition_by", "[]"))
        self.replace_partition = json.loads(options.get("replace_partition", "null"))
        self.run_id = options.get("run_id", "")
        self.options = dict(options)
        self.overwrite = overwrite
        self.rows_per_file = int(options.get("rows_per_file", "1000000"))

    # --- executor side -----------------------------------------------------------------
    def write(self, iterator: Iterator[pa.RecordBatch]) -> DeltaFilesMessage:
        from a3gr.lake import conform_arrow

        filesystem, base = _filesystem(self.table_uri)
        data_schema = pa.schema([f for f in self.schema if f.name not in self.partition_by])
        writers: dict[tuple, tuple[pq.ParquetWriter, str, dict, list[int]]] = {}
        try:
            for batch in iterator:
                table = conform_arrow(batch, self.schema, self.table_name)
                for values, part in self._split_by_partition(table):
                    if values not in writers:
                        rel = self._relative_path(values)
                        filesystem.create_dir(os.path.dirname(f"{base}/{rel}"), recursive=True)
                        sink = filesystem.open_output_stream(f"{base}/{rel}")
                        writers[values] = (pq.ParquetWriter(sink, data_schema), rel, dict(
                            zip(self.partition_by, values)), [0])
                    writer, _, _, count = writers[values]
                    writer.write_table(part.select(data_schema.names))
                    count[0] += part.num_rows
            actions = []
            for writer, rel, pvalues, count in writers.values():
                writer.close()
                info = filesystem.get_file_info(f"{base}/{rel}")
                actions.append({"path": rel, "size": info.size, "partition_values": pvalues,
                                "modification_time": int(time.time() * 1000),
                                "stats": json.dumps({"numRecords": count[0]})})
            return DeltaFilesMessage(actions=actions)
        except BaseException:
            for writer, rel, _, _ in writers.values():
                try:
                    writer.close()
                finally:
                    filesystem.delete_file(f"{base}/{rel}")
            raise

    def _split_by_partition(self, table: pa.Table):
        """(partition values as strings, rows) per distinct partition, computed by Arrow, not per row in Python."""
        if not self.partition_by:
            yield (), table
            return
        keys = table.select(self.partition_by).cast(pa.schema([(c, pa.string()) for c in self.partition_by]))
        for values in sorted(keys.group_by(self.partition_by).aggregate([]).to_pylist(),
                             key=lambda r: tuple(r[c] for c in self.partition_by)):
            mask = None
            for c in self.partition_by:
                match = pc.equal(keys[c], values[c])
                mask = match if mask is None else pc.and_(mask, match)
            yield tuple(values[c] for c in self.partition_by), table.filter(mask)

    def _relative_path(self, values: tuple) -> str:
        prefix = "".join(f"{quote(c)}={quote(v)}/" for c, v in zip(self.partition_by, values))
        return f"{prefix}part-{uuid.uuid4().hex}.parquet"

    # --- driver side -------------------------------------------------------------------
    def commit(self, messages: list[DeltaFilesMessage | None]) -> None:
        from deltalake import CommitProperties, DeltaTable
        from deltalake import Schema as DeltaSchema
        from deltalake.transaction import AddAction, create_table_with_add_actions

        from a3gr.lake import retry_on_conflict

        actions = [AddAction(a["path"], a["size"], a["partition_values"], a["modification_time"], True,
                             a["stats"]) for m in messages if m for a in m.actions]
        if os.environ.get(FAILPOINT_ENV) == f"pause_before_delta_commit:{self.run_id}":
            open(os.environ["A3GR_FAILPOINT_MARKER"], "w").close()
            time.sleep(600)
        storage = _storage_options(self.options)
        props = CommitProperties(custom_metadata={"run_id": self.run_id})
        mode = "overwrite" if self.overwrite else "append"
        filters = ([(c, "=", str(v)) for c, v in self.replace_partition.items()]
                   if self.replace_partition else None)

        def attempt():
            if not DeltaTable.is_deltatable(self.table_uri, storage_options=storage):
                create_table_with_add_actions(self.table_uri, DeltaSchema.from_arrow(self.schema), actions, mode="overwrite",
                                              partition_by=self.partition_by or None,
                                              storage_options=storage, commit_properties=props)
                return
            DeltaTable(self.table_uri, storage_options=storage).create_write_transaction(
                actions, mode, self.schema, partition_by=self.partition_by or None,
                partition_filters=filters, commit_properties=props)

        try:
            retry_on_conflict(attempt)
        except BaseException:
            self.abort(messages)
            raise

    def abort(self, messages: list[DeltaFilesMessage | None]) -> None:
        filesystem, base = _filesystem(self.table_uri)
        for m in messages:
            for a in (m.actions if m else []):
                try:
                    filesystem.delete_file(f"{base}/{a['path']}")
                except FileNotFoundError:
                    pass


class _DeltaFile(InputPartition):
    def __init__(self, uri: str, partition_values: dict):
        super().__init__(uri)
        self.uri = uri
        self.partition_values = partition_values


class _DeltaRsReader(DataSourceReader):
    def __init__(self, options: dict, schema: pa.Schema):
        self.options = dict(options)
        self.schema = schema

    def partitions(self):
        from deltalake import DeltaTable

        version = self.options.get("version")
        dt = DeltaTable(self.options["path"], version=int(version) if version not in (None, "") else None,
                        storage_options=_storage_options(self.options))
        adds = pa.table(dt.get_add_actions(flatten=True)).to_pylist()
        base = self.options["path"].rstrip("/")
        parts = []
        for a in sorted(adds, key=lambda a: a["path"]):
            pvalues = {k.removeprefix("partition."): v for k, v in a.items() if k.startswith("partition.")}
            parts.append(_DeltaFile(f"{base}/{unquote(a['path'])}", pvalues))
        return parts or [_DeltaFile("", {})]

    def read(self, partition: _DeltaFile):
        if not partition.uri:
            return
        filesystem, path = _filesystem(partition.uri)
        table = pq.read_table(path, filesystem=filesystem)
        for name, value in partition.partition_values.items():
            typ = self.schema.field(name).type
            table = table.append_column(name, pa.array([value] * table.num_rows, pa.string()).cast(typ))
        table = table.select(self.schema.names)
        for batch in table.cast(self.schema).to_batches(max_chunksize=65536):
            yield batch


class DeltaRsDataSource(DataSource):
    """`spark.read/write.format("a3gr_delta")`: Delta via delta-rs, one transaction per job."""

    @classmethod
    def name(cls) -> str:
        return FORMAT

    def _arrow_schema(self) -> pa.Schema:
        if "arrow_schema" in self.options:
            return decode_schema(self.options["arrow_schema"])
        from deltalake import DeltaTable

        version = self.options.get("version")
        dt = DeltaTable(self.options["path"], version=int(version) if version not in (None, "") else None,
                        storage_options=_storage_options(self.options))
        return pa.schema(dt.schema().to_arrow())

    def schema(self):
        return from_arrow_schema(self._arrow_schema())

    def reader(self, schema):
        return _DeltaRsReader(self.options, self._arrow_schema())

    def writer(self, schema, overwrite: bool):
        return _DeltaRsWriter(self.options, overwrite)


def register(spark: SparkSession) -> None:
    spark.dataSource.register(DeltaRsDataSource)


def _common_options(lake, table: str) -> dict:
    return {"path": lake.uri(table), "table": table,
            "storage_options_env": json.dumps(getattr(lake, "storage_options_env", {}) or {})}


def write_df(df: DataFrame, lake, table: str, mode: str = "overwrite", replace_partition: dict | None = None,
             run_id: str = "", engine: str = "delta-rs") -> int:
    """Write a DataFrame to a catalog table in one Delta transaction; returns the new version.

    mode: "overwrite" replaces the table (or only `replace_partition`, e.g. {"run_date": "2026-12-05"});
    "append" adds rows.
    """
    from a3gr.catalog import spec

    s = spec(table)
    if engine == "delta-spark":
        writer = df.write.format("delta").mode(mode).partitionBy(*s.partition_by)
        if replace_partition:
            # Values are validated literals: partition columns are catalog names, values plain strings.
            cond = " AND ".join(f"{c} = '{_literal(v)}'" for c, v in replace_partition.items())
            writer = writer.option("replaceWhere", cond)
        writer.save(lake.uri(table))
    else:
        options = _common_options(lake, table) | {
            "arrow_schema": encode_schema(s.schema), "partition_by": json.dumps(list(s.partition_by)),
            "replace_partition": json.dumps(replace_partition), "run_id": run_id}
        # The Python data source supports append/overwrite; the flag reaches writer(overwrite=...).
        df.write.format(FORMAT).mode("overwrite" if mode == "overwrite" else "append").options(**options).save()
    return lake.version(table)


def _literal(value) -> str:
    text = str(value)
    if not all(ch.isalnum() or ch in "-_:. " for ch in text):
        raise ValueError(f"partition value {text!r} contains characters not allowed in a partition literal")
    return text


def read_df(spark: SparkSession, lake, table: str, version: int | None = None,
            engine: str = "delta-rs") -> DataFrame:
    """A catalog table (at a version, latest by default) as a Spark DataFrame."""
    if not lake.exists(table):
        from a3gr.lake import MissingTableError

        raise MissingTableError(f"table '{table}' does not exist at {lake.uri(table)}; run the job that writes it first")
    # Pin the version now, so a job reads one snapshot even if the table is overwritten meanwhile.
    version = lake.version(table) if version is None else version
    if engine == "delta-spark":
        return spark.read.format("delta").option("versionAsOf", version).load(lake.uri(table))
    options = _common_options(lake, table) | {"version": str(version)}
    return spark.read.format(FORMAT).options(**options).load()
