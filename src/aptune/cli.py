"""The ``aptune`` command line. Each subcommand is a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .arch import UnsupportedModelError
from .assets import AssetError
from .compact import PrunedModelError
from .masks import MaskError

# Errors that mean "bad input": printed as one line, exit status 2, no traceback.
USER_ERRORS = (UnsupportedModelError, PrunedModelError, MaskError, AssetError, ValueError, FileNotFoundError)


def _info(args: argparse.Namespace) -> int:
    from .arch import describe
    from .assets import minilm_path
    from .budget import StructureShape, param_report
    from .compact import load_pruned, read_structure

    path = Path(args.path) if args.path else minilm_path()
    model = load_pruned(path)
    structure = describe(model)
    shape = StructureShape.of(structure)
    base = getattr(model, "_aptune_base_shape", shape)
    report = param_report(model)
    saved = read_structure(path)
    plain = saved.plain_loadable if saved is not None else True
    if args.json:
        out = {
            "path": str(path),
            "model_class": type(model).__name__,
            **report,
            "hidden": shape.hidden,
            "hidden_before": base.hidden,
            "heads": list(shape.heads),
            "heads_before": list(base.heads),
            "neurons": list(shape.neurons),
            "neurons_before": list(base.neurons),
            "plain_from_pretrained": plain,
        }
        print(json.dumps(out, indent=2))
        return 0
    print(f"model      {path}")
    print(f"class      {type(model).__name__} (family {report['family']})")
    print(f"hidden     {shape.hidden} of {base.hidden} channels")
    print(f"{'layer':>5}  {'heads':>9}  {'FFN neurons':>13}")
    for i, (a, f) in enumerate(zip(structure.attention, structure.ffn, strict=True)):
        print(f"{i:>5}  {a.num_heads:>4}/{base.heads[i]:<4}  {f.num_neurons:>6}/{base.neurons[i]:<6}")
    print(
        f"prunable   {report['prunable']:,} of {report['prunable_before']:,} parameters "
        f"(density {report['density']:.3f})"
    )
    print(
        f"other      embeddings {report['embeddings']:,}, task head {report['task_head']:,}, total {report['total']:,}"
    )
    print(f"loading    aptune.load_pruned(path){'; also AutoModel*.from_pretrained(path)' if plain else ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aptune", description="Adaptive Pruning and Tuning for transformers"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="show the structure, parameter counts and density of a model folder")
    info.add_argument("path", nargs="?", help="model folder (default: the packaged all-MiniLM-L6-v2)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"aptune {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
