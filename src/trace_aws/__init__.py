"""AWS adapters for Trace's ports (installed with the ``aws`` extra; they import boto3).

* ``trace_aws.sqs_queue.SqsQueue`` -- Queue on SQS (+ DLQ redrive)
* ``trace_aws.s3_store.S3ObjectStore`` -- ObjectStore on S3 / MinIO (presigned URLs)
* ``trace_aws.kms_signer.KmsSigner`` -- Signer on KMS ECC_NIST_P256 keys (ES256)
* ``trace_aws.credentials.StsCredentialMinter`` -- attempt-scoped S3 credentials (STS); the
  policy itself is the pure ``trace_aws.session_policy``
* ``trace_aws.lambda_invoker`` -- ``runtime: lambda`` tasks (Invoke, event mode, no retries)
* ``trace_aws.secrets.SecretsManagerStore`` -- SecretStore on Secrets Manager
* ``trace_aws.testing`` -- a moto server process and a SigV4 presigned-URL gate for tests

This package imports nothing from boto3 itself: ``import trace_aws`` is always safe; the
adapter modules are imported by ``trace_servers.profiles`` only when ``TRACE_PROFILE=aws``.
"""
