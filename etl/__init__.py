"""PySpark ETL: raw files -> bronze (`sources`, `synthetic`) -> silver and gold tables."""
