"""The DreamCache adapter trainer (``torchrun training/train.py``). Reads the shards the pipeline writes;
their format is docs/dataset-format.md."""
