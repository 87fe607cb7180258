"""`./launch.sh export --ckpt RUN_OR_FILE --format timm|mae --out OUT [--pool token|avg]`: the pre-trained encoder
for other code bases (train/eval/export.py does the work; README "Use the weights elsewhere").

    ./launch.sh export --ckpt runs/supmae400 --format timm --out exports/supmae400    # timm's local-dir: / hf-hub:
    ./launch.sh export --ckpt runs/supmae400 --format mae --out supmae400_encoder.pth   # MAE's fine-tuning code

Exit status: 0 written, 2 bad arguments or input (a message, no traceback).
"""

from __future__ import annotations

import argparse
import sys

from train.eval.export import FORMATS, POOLS, ExportConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="./launch.sh export", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a run folder (its newest checkpoint), a checkpoint file of this "
                   "project, an original MAE/SupMAE .pth, or a timm folder / .safetensors file")
    p.add_argument("--format", required=True, choices=FORMATS, help="timm: a hub-style folder (config.json + "
                   "model.safetensors); mae: one .pth in the official release layout ({'model': encoder state})")
    p.add_argument("--out", required=True, help="the folder (timm: new, empty or an earlier export) or file (mae: "
                   "must not exist) to write")
    p.add_argument("--pool", default="token", choices=POOLS, help="timm's pooled feature: token (cls token after "
                   "the norm; timm's default) or avg (mean of the normed patch tokens) [token]")
    p.add_argument("--num-heads", type=int, default=0, help="attention heads of a .pth encoder (default: "
                   "embed_dim / 64); a checkpoint of this project carries its own")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = ExportConfig(args.ckpt, args.format, args.out, args.pool, args.num_heads)
        source, files = cfg.run(warn=lambda m: print(f"export: {m}", file=sys.stderr))
    except (ValueError, FileNotFoundError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    mc = source.model_cfg
    print(f"export: {source.name} (step {source.step}): encoder {mc.embed_dim}-d x {mc.depth} blocks, "
          f"{mc.img_size} px patch {mc.patch_size} -> {cfg.format}")
    for f in files:
        print(f"export: wrote {f}")
    if cfg.format == "timm":
        print(f'export: load it with timm.create_model("local-dir:{cfg.out}", pretrained=True)')
    return 0


if __name__ == "__main__":
    sys.exit(main())
