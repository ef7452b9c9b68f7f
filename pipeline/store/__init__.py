"""The job's output: row schema, the settings contract, the Parquet + LanceDB store."""
