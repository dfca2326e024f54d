"""Kaggle ILSVRC download -> deterministic WebDataset shards (local folder or s3://).

    python -m shard_builder build --source ~/imagenet --output s3://bucket/imagenet-10pct --subset-percentage 10
    python -m shard_builder verify s3://bucket/imagenet-10pct --deep
    python -m shard_builder download --dest ~/imagenet
    python -m shard_builder demo-tree /tmp/demo-tree
"""
