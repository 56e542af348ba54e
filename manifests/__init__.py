"""The dataset layout, the manifest schema and the tools that read them.

``manifests.schema`` defines what the pipeline writes (docs/dataset-format.md describes it for users);
``dreamcache.store`` reads and writes it on local disks and any fsspec filesystem; ``manifests.index``
aggregates manifests into ``dataset.json``.
"""
