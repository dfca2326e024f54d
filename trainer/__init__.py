"""ResNet-50 training on the WebDataset shards: input pipeline, presets, training loop.

The input pipeline (``trainer.loader``) streams shards from a local folder or ``s3://`` into
DDP ranks and DataLoader workers with exact epochs and exact resume::

    from trainer.loader import LoaderConfig, RunLoader
    cfg = LoaderConfig(root="s3://bucket/imagenet-10pct", batch_size=256, num_workers=8)
    with RunLoader(cfg) as loaders:        # workers start once, for the whole run
        for batch in loaders.train_epoch(3, start_batch=120):
            ...  # batch.images: uint8 [B,3,H,W]; batch.labels: int64 [B]
"""
