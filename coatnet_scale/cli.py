"""The config part of every launcher's command line: `--config`, `--model`, dotted overrides.

The library never reads `sys.argv`; launchers (`launch/*.py`) build a parser, add their own flags,
and pass their argv here. Overrides are written `section.key=value` or `--section.key=value` /
`--section.key value`. `--local_rank`, which the `deepspeed` launcher puts first on the command
line, is accepted and ignored: ranks are read from the environment (distributed/env.py).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from coatnet_scale.config import Config, ConfigError, describe, dump_yaml, load_config


def config_parser(description: str) -> argparse.ArgumentParser:
    """An ArgumentParser with the config arguments; launchers add their own flags to it."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog="Overrides: section.key=value (e.g. optim.lr=5e-4 model.image_size=384). "
        "--help-config lists every key.",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="YAML",
        help="config file, applied after the model recipe (repeatable)",
    )
    parser.add_argument(
        "--model", metavar="NAME", help="model variant; loads its recipe configs/NAME.yaml first"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    parser.add_argument(
        "--help-config",
        action="store_true",
        help="list every config key with its type, default and meaning, and exit",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return parser


def _dotted_options(extra: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """Turn leftover `--section.key=value` / `--section.key value` into `section.key=value`."""
    overrides: list[str] = []
    items = list(extra)
    while items:
        item = items.pop(0)
        if not item.startswith("-") and "=" in item:
            overrides.append(item)  # a positional override that argparse left over
            continue
        name = item[2:] if item.startswith("--") else ""
        if "." not in name.partition("=")[0]:
            parser.error(f"unrecognized argument {item!r}")
        if "=" in name:
            overrides.append(name)
        elif items:
            overrides.append(f"{name}={items.pop(0)}")
        else:
            parser.error(f"{item} needs a value")
    return overrides


def parse_config_args(
    argv: Sequence[str] | None, parser: argparse.ArgumentParser
) -> tuple[Config, argparse.Namespace]:
    """Parse argv into (Config, launcher flags). Exits with one line on a config error.

    `--help-config` and `--print-config` are handled here and exit, like `--help`.
    """
    args, extra = parser.parse_known_args(argv)
    if args.help_config:
        print("\n".join(describe()))
        raise SystemExit(0)
    overrides = [*args.overrides, *_dotted_options(extra, parser)]
    try:
        cfg = load_config(args.config, overrides, model=args.model)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.print_config:
        print(dump_yaml(cfg), end="")
        raise SystemExit(0)
    return cfg, args
