"""ResNet-50 training on the WebDataset shards: input pipeline, presets, training loop.

The input pipeline (``trainer.data``) streams shards from a local folder or ``s3://`` into
DDP ranks and DataLoader workers with exact epochs and exact resume::

    from trainer.data import LoaderConfig, make_train_loader, make_val_loader
    cfg = LoaderConfig(root="s3://bucket/imagenet-10pct", batch_size=256, num_workers=8)
    for batch in make_train_loader(cfg, epoch=3, start_batch=120):
        ...  # batch.images: uint8 [B,3,H,W]; batch.labels: int64 [B]
"""
