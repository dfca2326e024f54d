"""Pieces shared by the shard builder and the trainer: storage, manifest, classes, logging."""
