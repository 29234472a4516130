"""AWS adapters (SQS, S3, KMS, STS, Lambda, Secrets Manager). Installed with the ``aws`` extra; built in a later issue."""
