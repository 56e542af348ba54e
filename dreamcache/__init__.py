"""Personalised generation with DreamCache adapters: the pipeline, the feature cache and the evaluation."""
