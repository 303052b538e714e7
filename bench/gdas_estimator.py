"""GDAS's architecture gradient on NAS-Bench-201 as the package computes it, against the one of
the NB201 authors' own GDAS code (xautodl, whose searches gave the published 93.61).

Both run only the sampled operation of an edge, with the hard one-hot weights h = one_hot -
p.detach() + p (p = softmax((log_softmax(alpha) + g) / tau)). The package's edge outputs
h_s * op_s(x), so the architecture gradient is G_s dp_s/dalpha with G_s = <dL/dout, op_s(x)>, and
a sampled ``none`` (G = 0) moves nothing. xautodl's ``forward_gdas`` outputs
``sum(h_k * op_k(x) if k == s else h_k)``: every operation not sampled adds its weight (value 0)
as a scalar, so each gets G_k = sum(dL/dout), and the gradient becomes (G_s - sum(dL/dout)) times
the same factor: the sampled operation is measured against a uniform shift of the node, and a
sampled ``none`` now moves the alphas.

    python bench/gdas_estimator.py [--seeds 0,1,2] [--rows FILE]     # the budget of search_quality.py

Runs GDAS (``--topo plain``) with xautodl's scalar terms added by a forward hook on every mixed
edge, at the budget of ``search_quality.py``, and scores the derived cells the same way; compare
with the ``gdas / plain`` rows of ``search_quality.py`` (the same seeds and data).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _quality_search as Q  # noqa: E402
import search_quality as SQ  # noqa: E402

from toponas_kernels.nas import FusedMixedOp  # noqa: E402

LABEL = "gdas-xautodl"  # the rows' method name


def add_xautodl_terms(model: torch.nn.Module) -> list:
    """Forward hooks on every mixed edge of ``model`` that add, as xautodl's ``forward_gdas``
    does, the weights of the operations not sampled (value 0) to the edge's output; returns the
    hook handles."""

    def hook(module, inputs, output):
        weights = inputs[1]
        not_sampled = weights.masked_fill(weights.detach().ne(0), 0.0)
        return output + not_sampled.sum()

    return [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, FusedMixedOp)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rows", default=str(SQ.H.REPO / "bench" / "search_quality_gdas_xautodl_rows.json"))
    ap.add_argument("--table", default="analog-nasbench")
    ap.add_argument("--threads", type=int, default=1)
    Q.add_budget_arguments(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    budget = Q.budget_from_args(args)
    bd = SQ.budget_dict(budget)
    seeds = [int(s) for s in args.seeds.split(",")]
    done = {r["seed"] for r in SQ.load_rows(args.rows) if r["budget"] == bd}
    for seed in seeds:
        if seed in done:
            continue
        print(f"gdas with xautodl's scalar terms, seed {seed}", file=sys.stderr, flush=True)
        r = Q.search("gdas", "plain", seed, budget, prepare=add_xautodl_terms)
        SQ.add_row(args.rows, {"method": LABEL, "topo": "plain", "seed": seed, "budget": bd, **r})
    rows = [r for r in SQ.load_rows(args.rows) if r["budget"] == bd and r["seed"] in seeds]
    truth, label = SQ.ground_truth(args.table)
    scored = SQ.score(rows, truth)
    print(f"Ground truth: {label}.\n")
    print(SQ.score_table(scored))
    print()
    print(SQ.trajectory_table(scored))
    return 0


if __name__ == "__main__":
    sys.exit(main())
