"""Chain ingest for Trace Lite: a local EVM dev node and activity on it (``devnode``), and the
``cryo_ingest`` operator (``cryo_ingest``). See docs/architecture/ingest.md."""
