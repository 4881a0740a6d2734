"""One place that builds the Spark session, locally or under spark-submit."""
from __future__ import annotations

import os
import sys

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.pandas.types import from_arrow_schema

from a3gr.catalog import spec
from a3gr.config import PipelineConfig


def get_spark(cfg: PipelineConfig, app_name: str = "align3gr") -> SparkSession:
    """The active session, or a new one configured for UTC and Arrow; registers our Delta data source."""
    # Local Spark binds to the host name, which may not resolve in containers.
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = (
        SparkSession.builder.appName(app_name)
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", str(cfg.spark.shuffle_partitions))
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.driver.memory", cfg.spark.driver_memory)
        .config("spark.ui.enabled", "false")
        .config("spark.sql.ansi.enabled", "false")
    )
    # Under spark-submit the JVM gateway already exists and --master is the cluster's choice.
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        builder = builder.master(cfg.spark.master)
    for key, value in cfg.spark.extra_conf.items():
        builder = builder.config(key, str(value))
    spark = SparkSession.builder.getOrCreate() if SparkSession.getActiveSession() else builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    from a3gr.spark_delta import register

    register(spark)
    return spark


def spark_schema(table: str) -> T.StructType:
    """The catalog schema of a table as a Spark StructType."""
    return from_arrow_schema(spec(table).schema)


def conform(df: DataFrame, table: str) -> DataFrame:
    """Select and cast `df` to the catalog schema of `table` (names, order, types).

    Nullability is not expressible on a Spark column after a cast; the Delta writer and the
    expectation suites reject nulls in required columns.
    """
    schema = spark_schema(table)
    missing = [f.name for f in schema if f.name not in df.columns]
    if missing:
        raise ValueError(f"table '{table}': missing column(s) {', '.join(missing)}; "
                         f"the DataFrame has {', '.join(df.columns)}")
    return df.select([F.col(f.name).cast(f.dataType).alias(f.name) for f in schema])
