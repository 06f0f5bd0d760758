"""`python -m coatnet_scale.checkpoint {list,verify,export} ...`"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from coatnet_scale.checkpoint.export import export, resolve_checkpoint
from coatnet_scale.checkpoint.layout import (
    EXPORT_CONFIG,
    CheckpointError,
    checkpoints_in,
    list_checkpoints,
    verify,
)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m coatnet_scale.checkpoint {list,verify,export} ...`"""
    parser = argparse.ArgumentParser(
        prog="python -m coatnet_scale.checkpoint", description="list, verify or export checkpoints"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("list", help="committed checkpoints of a run and whether they verify")
    show.add_argument("run", type=Path, help="run folder or its checkpoints folder")
    check = sub.add_parser("verify", help="check one checkpoint against its manifest")
    check.add_argument("checkpoint", type=Path)
    out = sub.add_parser("export", help="consolidated fp32 safetensors + config.json")
    out.add_argument("checkpoint", type=Path, help="a stepN folder, or a run folder (newest valid)")
    out.add_argument("--out", type=Path, required=True, help="output folder")
    out.add_argument("--ema", action="store_true", help="export the EMA weights")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            root = checkpoints_in(args.run)
            for ckpt in list_checkpoints(root):
                problems = verify(ckpt)
                print(f"{ckpt.name}  {'ok' if not problems else 'DAMAGED: ' + problems[0]}")
            return 0
        if args.command == "verify":
            problems = verify(args.checkpoint)
            print("\n".join(problems) if problems else f"{args.checkpoint}: ok")
            return 1 if problems else 0
        weights = export(resolve_checkpoint(args.checkpoint), args.out, args.ema)
        print(f"wrote {weights} and {weights.with_name(EXPORT_CONFIG)}")
        return 0
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
