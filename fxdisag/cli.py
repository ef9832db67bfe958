"""``python -m fxdisag``: graph dumps, plans and simulations from the command line.

Sub-commands:
  dump      capture a model and print its region table and tagged graph
  plan      choose attention/expert ranks, placement and micro-batches for a cluster
  simulate  run the plan's schedule through the discrete-event simulator
"""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["main", "build_parser"]


def _add_dump(sub) -> None:
    p = sub.add_parser(
        "dump",
        help="capture a model and print its region table and tagged FX graph",
        description="Capture a model (a full-size registry name, built on the meta device, or a tiny "
        "random-weight family) and print its region table and region-tagged graph. Set "
        "FXDISAG_DUMP_DIR=DIR to also write every intermediate graph of any run to DIR.",
    )
    p.add_argument("--model", required=True, help="registry name (e.g. deepseek-v3) or tiny family (e.g. qwen3_moe)")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=None, help="default: 4096 for registry models, 16 for tiny ones")
    p.add_argument("--svg", metavar="FILE", help="also draw the graph, colored by region (needs pydot + graphviz)")
    p.add_argument("--no-code", action="store_true", help="print only the region table")
    p.set_defaults(func=_run_dump)


def _run_dump(args: argparse.Namespace) -> int:
    import torch

    from fxdisag.capture import capture
    from fxdisag.dump import region_table, tagged_code, write_svg
    from fxdisag.testing.models import REGISTRY, resolve_model

    full = args.model in REGISTRY
    model = resolve_model(args.model, num_layers=args.layers) if full or args.layers else resolve_model(args.model)
    seq = args.seq_len or (4096 if full else 16)
    device = "meta" if full else "cpu"
    ids = torch.zeros(args.batch_size, seq, dtype=torch.long, device=device)
    t0 = time.perf_counter()
    captured = capture(model, {"input_ids": ids, "labels": ids})
    seconds = time.perf_counter() - t0
    print(f"# {type(model).__name__} ({args.model}), input {args.batch_size}x{seq}, captured in {seconds:.2f} s")
    print(region_table(captured))
    if not args.no_code:
        print()
        print(tagged_code(captured.graph_module))
    if args.svg:
        write_svg(captured.graph_module, args.svg)
        print(f"# wrote {args.svg}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fxdisag",
        description="fxdisag: attention/expert disaggregation (AF-Pipe) for MoE training, as an FX transformation.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_dump(sub)
    try:
        from fxdisag.cli_plan import add_plan_parsers
    except ImportError:  # the planner is optional until it lands
        add_plan_parsers = None
    if add_plan_parsers is not None:
        add_plan_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ImportError, ValueError) as exc:  # user errors: one clear line, no traceback
        print(f"fxdisag {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
