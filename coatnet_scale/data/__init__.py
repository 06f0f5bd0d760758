"""Input data, one job per module:

- `shards`: manifests (per-shard counts, sizes, checksums, label histograms) and `TarIndex`
  (random access into a tar shard);
- `order`: which sample each slot of the run holds (pure: mixing weights, window and global epoch
  orders, the batch plan, the class-mixing check);
- `reader`: reading samples through shard indexes, and what counts as bad data;
- `transforms`: decoding (at reduced size where possible) and augmenting one sample;
- `pipeline`: the train and eval loaders (streams, workers, position, bad-sample accounting).
"""
