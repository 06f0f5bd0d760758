"""Input data: shard manifests, the resumable/elastic train pipeline, the eval pipeline."""
