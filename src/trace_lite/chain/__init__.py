"""Chain ingest for Trace Lite: a local EVM dev node and activity on it (``devnode``). The
``cryo_ingest`` operator lives in the worker SDK (``trace_sdk.ingest``). See
docs/architecture/ingest.md."""
