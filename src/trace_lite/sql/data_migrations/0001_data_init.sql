-- Data database baseline: the schema `data` that holds dataset tables (data.dsv_<version hex>,
-- trace_lite.datasets.table_name / DATA_SCHEMA).
CREATE SCHEMA IF NOT EXISTS data;
