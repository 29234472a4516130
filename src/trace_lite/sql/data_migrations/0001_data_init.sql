-- Data database baseline: a schema for datasets that later migrations fill in.
CREATE SCHEMA IF NOT EXISTS data;
