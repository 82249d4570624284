"""The driver side: placement, replicas, dispatch, streaming, retries, job submission and the CLI."""
