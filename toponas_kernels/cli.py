"""The ``toponas`` command (also ``python -m toponas_kernels``).

    toponas simplify --space darts            # Table II: module counts per stage, and the graphs
    toponas simplify --space darts --json     # {"stages": [{"name", "conv", "non_conv", "total"}]}
    toponas simplify --space exaggerated --num-sep-dil 5 --num-double-sep 7 --stride 2
    toponas simplify --space darts --C 64 --device cuda --merge auto   # the form of each merged conv
    toponas spaces                            # the built-in spaces, op by op, as module chains
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .nas import simplify as simp
from .nas.forms import MERGE_CHOICES
from .nas import spaces as S


def _space(args) -> S.SearchSpace:
    if args.space == "exaggerated":
        space = S.exaggerated_space(args.num_sep_dil, args.num_double_sep)
    else:
        space = S.get_space(args.space)
    if args.primitives:
        space = space.subset([p.strip() for p in args.primitives.split(",") if p.strip()])
    return space


def _forms(space: S.SearchSpace, args) -> list[dict]:
    """The form each merged conv group of the topo edge runs in at ``args.C`` channels on
    ``args.device``, and why (``nas/forms.py``)."""
    from .nas.mixed_op import FusedMixedOp

    op = FusedMixedOp(args.C, args.stride, primitives=space, merge=args.merge, normalize=not args.no_normalize)
    out = []
    for node, form, why in op.merge_forms(device_type=args.device):
        names = ", ".join(space.names[p.owners[0][0]] for p in node.parts)
        group = f"conv{node.size}x{node.size}" + (f" s{node.stride}" if node.stride != 1 else "") + f" {{{names}}}"
        out.append({"group": group, "form": form, "why": why})
    return out


def _cmd_simplify(args) -> int:
    space = _space(args)
    rows = simp.stages(space, args.stride)
    forms = _forms(space, args)
    if args.json:
        out = {
            "space": space.name,
            "stride": args.stride,
            "primitives": list(space.names),
            "stages": [
                {"name": name, "conv": c.conv, "non_conv": c.non_conv, "total": c.total} for name, _, c in rows
            ],
            "forms": forms,
        }
        print(json.dumps(out))
        return 0
    print(f"space {space.name}, stride {args.stride}: {', '.join(space.names)}")
    print()
    print(f"{'stage':<10} {'conv':>5} {'non-conv':>9} {'total':>6}")
    for name, _, c in rows:
        print(f"{name:<10} {c.conv:>5} {c.non_conv:>9} {c.total:>6}")
    if args.graph != "none":
        for name, graph, _ in rows:
            if args.graph == "all" or name == args.graph:
                print()
                print(f"== {name} ==")
                print(simp.format_graph(graph))
    print()
    print(f"== forms of the merged convs (C = {args.C} at the edge, {args.device}, merge={args.merge}) ==")
    for f in forms:
        print(f"{f['group']}: {f['form']}  ({f['why']})")
    return 0


def _cmd_spaces(args) -> int:
    for space in (S.DARTS_SPACE, S.NB201_SPACE, S.exaggerated_space()):
        print(f"{space.name}:")
        for op in space:
            chain = " -> ".join(m.describe() for m in op.chain(1))
            reduce = " -> ".join(m.describe() for m in op.chain(2)) if _strideable(op) else "(no stride 2)"
            print(f"  {op.name:<16} {chain}")
            print(f"  {'':<16} stride 2: {reduce}")
    return 0


def _strideable(op: S.OpDef) -> bool:
    try:
        op.chain(2)
    except ValueError:
        return False
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toponas", description="TopoNAS kernels: tools")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simplify", help="module counts of an edge per simplification stage (paper Table II)")
    p.add_argument("--space", default="darts", choices=S.SPACE_NAMES, help="search space (default darts)")
    p.add_argument("--stride", type=int, default=1, choices=(1, 2), help="edge stride (default 1)")
    p.add_argument("--primitives", default=None, help="comma-separated subset of the space's operations")
    p.add_argument(
        "--num-sep-dil", type=int, default=5, help="exaggerated space: separable dilated convs (default 5, Table VI)"
    )
    p.add_argument(
        "--num-double-sep", type=int, default=7,
        help="exaggerated space: double-stacked separable convs (default 7, Table VI)",
    )
    p.add_argument("--json", action="store_true", help="print the counts as JSON only")
    p.add_argument("--C", type=int, default=16, help="channels at the edge, for the forms of the merged convs (default 16)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device the forms are chosen for (default cpu)")
    p.add_argument("--merge", default="auto", choices=MERGE_CHOICES, help="form of the merged convs (default auto)")
    p.add_argument("--no-normalize", action="store_true", help="merged convs without kernel normalization")
    p.add_argument(
        "--graph", default="all", choices=("all", "none") + tuple(n for n, _ in simp.STAGES),
        help="which stages' graphs to print (default all)",
    )
    p.set_defaults(func=_cmd_simplify)

    p = sub.add_parser("spaces", help="list the built-in search spaces as module chains")
    p.set_defaults(func=_cmd_spaces)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"toponas: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
