"""Pieces shared by the shard builder and the trainer: storage (local and s3://), manifest, lease,
exit codes and the CLI error handler, logging."""
