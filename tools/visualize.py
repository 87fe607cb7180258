"""`./launch.sh visualize --ckpt RUN --data SHARDS --out FILE.png [--num 8] [--mask-ratio 0.75] [--seed S]`:
MAE's reconstruction picture of a checkpoint (train/tracking/pictures.py does the work).

Rows: the first --num images of SHARDS (resize + centre crop); columns: original, masked, reconstruction, and the
reconstruction with the visible patches pasted back. Exit status: 0 written, 2 bad arguments or input.
"""

from __future__ import annotations

import argparse
import sys

from train.tracking.pictures import VisualizeConfig, visualize


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="./launch.sh visualize", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a run folder (its newest checkpoint), a checkpoint file, or an "
                   "MAE/SupMAE .pth with its decoder")
    p.add_argument("--data", required=True, help="shard folder the images come from (e.g. the validation shards)")
    p.add_argument("--out", required=True, help="the PNG file to write")
    p.add_argument("--num", type=int, default=8, help="images (rows) [8]")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches masked [0.75]")
    p.add_argument("--seed", type=int, default=0, help="seed of the masking [0]")
    p.add_argument("--data-backend", default="dali", choices=("dali", "torch"), help="loader backend [dali]")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="[auto]")
    p.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="whether the model predicts per-patch normalised pixels (default: the checkpoint's; a .pth "
                        "cannot tell and is taken as on, MAE's default; mae_visualize_vit_large.pth needs --no-...)")
    p.add_argument("--num-heads", type=int, default=0, help="attention heads of a .pth (default embed_dim / 64)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = VisualizeConfig(args.ckpt, args.data, args.out, args.num, args.mask_ratio, args.seed,
                              args.data_backend, args.device, args.norm_pix_loss, args.num_heads)
        path, rec, source = visualize(cfg, warn=lambda m: print(f"visualize: {m}", file=sys.stderr))
    except (ValueError, FileNotFoundError) as e:  # ShardFormatError is a ValueError
        print(f"visualize: error: {e}", file=sys.stderr)
        return 2
    print(f"visualize: {source.name} (step {source.step}): {rec.original.shape[0]} images, mask ratio "
          f"{rec.mask_ratio:g} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
