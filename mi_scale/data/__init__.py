"""Data layer: sources loaded through Hugging Face `datasets` (offline-capable)
and deterministic, resumable data-parallel batching.

    bundle = build_data(cfg.data, seed)        # train/test datasets + task facts
    batches = ShardedBatches(bundle.train, cfg.data.batch_size, rank, world_size, seed)
    batch = batches.next_batch()               # {"x": ..., "y": ...}
"""

from .build import DataBundle, build_data
from .errors import DataError
from .sharding import ShardedBatches

__all__ = ["DataBundle", "DataError", "ShardedBatches", "build_data"]
