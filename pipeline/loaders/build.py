"""`build_loader`: validate a shard folder and make the configured backend's loader.

Kept apart from `pipeline.loaders.base` because the backends build on that module's `LoaderBase`: the choice of a
backend imports them, and they import the base, never the other way round.
"""

from __future__ import annotations

import dataclasses

from pipeline.loaders.base import (
    LoaderBase,
    LoaderConfig,
    RankLayout,
    ShardSet,
    resolve_decode,
    resolve_device,
)


def build_loader(cfg: LoaderConfig, rank: int = 0, world_size: int = 1) -> LoaderBase:
    """Validate the data (manifest, every shard and index present with its size) and make the configured loader.

    rank / world_size: this process's place among the data-parallel ranks (shard_id / num_shards). An eval
    loader's batch is at most what one rank reads (ceil(samples / world size)): a batch size far above a small
    set's size (`visualize --num 1000000`, `knn --batch-size ...`) would otherwise allocate and pad a batch of
    that size.
    """
    shards = ShardSet.open(cfg.data)
    if not cfg.train:
        per_rank = -(-shards.num_samples // world_size)
        if cfg.batch_size > per_rank:
            cfg = dataclasses.replace(cfg, batch_size=max(1, per_rank))
    layout = RankLayout(shards.num_samples, world_size, rank, cfg.batch_size, bool(cfg.drop_last))
    device = resolve_device(cfg.device)
    decode = resolve_decode(cfg, device)
    if cfg.backend == "torch":
        from pipeline.loaders.torch_loader import TorchLoader

        return TorchLoader(cfg, shards, layout, device)
    try:
        import nvidia.dali  # noqa: F401  (both dali paths decode with it)
    except ImportError as e:
        raise ImportError(f"backend='dali' needs NVIDIA DALI ({e}); run `./launch.sh setup` or use "
                          "backend='torch'") from e
    if decode == "cpu":
        from pipeline.loaders.crop_decode import CropDecodeLoader

        return CropDecodeLoader(cfg, shards, layout, device)
    from pipeline.loaders.dali_loader import DaliLoader

    return DaliLoader(cfg, shards, layout, device)
