"""Where TopoNAS's search direction departs from its method's: along a plain search, the
architecture gradient of the ``topo`` supernet and that of the ``plain`` supernet on the same
weights and the same batch.

    python bench/search_direction.py [--method darts] [--epochs 8] [--every 16] [--seed 0] [--out FILE]

A plain search runs (``_quality_search.search``, the budget of ``search_quality.py`` with
``--epochs`` architecture-step epochs and every schedule scaled to them). Every ``--every`` steps,
before the step, a ``topo`` twin of the supernet takes the plain one's state: each mixed edge
through ``FusedMixedOp.load_plain_state`` (the candidates' parameters and buffers in
registration order), the rest (stem, ResNet blocks, classifier, alphas) by name. Both take the
architecture loss of the method (beta-DARTS' regularizer included) on the step's validation batch,
in training mode, from copies (the search's own supernet and RNG streams are untouched; a Gumbel
sampler draws the same sample in both). Recorded per measurement:

* ``cosine``: of the two gradients of the loss with respect to all architecture parameters;
* ``cumulative_cosine``: the cosine of the two gradients summed over the measurements so far
  (the direction the architecture drifts in over the search, single batches' noise averaged);
* ``edge_cosine``: its mean over the edges (rows of alphas);
* ``top_agree``: the share of edges on which both gradients favour the same operation (the most
  negative entry: the operation a descent step raises most);
* ``kendall``: the mean over edges of Kendall's tau between the two gradients' orders of the
  operations (1: the same order);
* ``sign_agree``: the share of entries whose signs agree (Adam's steps are close to sign steps,
  so this is what decides whether an alpha moves the same way);
* ``cosine_with_regularizer``: where the method adds one (beta-DARTS), the cosine of the gradients
  of the whole architecture loss (the regularizer's gradient is the same in both networks);
* both losses.

Writes the measurements as JSON (``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _quality_search as Q  # noqa: E402
import _harness as H  # noqa: E402

from toponas_kernels.nas import FusedMixedOp  # noqa: E402


def load_plain_into(twin: torch.nn.Module, plain: torch.nn.Module) -> None:
    """``twin`` (any mode) takes ``plain``'s state: every mixed edge through
    ``FusedMixedOp.load_plain_state``, every other parameter and buffer by name."""
    edges_t = {n: m for n, m in twin.named_modules() if isinstance(m, FusedMixedOp)}
    edges_p = {n: m for n, m in plain.named_modules() if isinstance(m, FusedMixedOp)}
    if edges_t.keys() != edges_p.keys():
        raise ValueError("twin and plain: the supernets' mixed edges differ")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BN statistics reset on a mode change: training mode ignores them
        for name, edge in edges_t.items():
            edge.load_plain_state(edges_p[name])
    rest = {k: v for k, v in plain.state_dict().items()
            if not any(k.startswith(n + ".") for n in edges_p) and not k.endswith("_extra_state")}
    missing, unexpected = twin.load_state_dict(rest, strict=False)
    if unexpected:
        raise ValueError(f"twin: unexpected state {unexpected[:3]}")
    left = [k for k in missing if not any(k.startswith(n + ".") for n in edges_t)]
    if left:
        raise ValueError(f"twin: state not loaded {left[:3]}")


def arch_grad(model, method_obj, x, y, seed: int) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """d(loss)/d(alphas) of ``model`` on (x, y), and that of the method's architecture loss when it
    adds a regularizer (beta-DARTS; else None), with the Gumbel noise (if any) drawn from
    ``seed``; the caller's RNG state is restored."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        own, method_obj.model = method_obj.model, model  # the regularizer reads the method's model
        try:
            reg = method_obj.regularizer()
        finally:
            method_obj.model = own
        (g,) = torch.autograd.grad(loss, [model.alphas], retain_graph=reg is not None)
        g_total = None
        if reg is not None:
            (g_total,) = torch.autograd.grad(loss + reg, [model.alphas])
            g_total = g_total.detach().double()
    finally:
        torch.set_rng_state(state)
    return g.detach().double(), g_total, float(loss.detach())


def _kendall(a: torch.Tensor, b: torch.Tensor) -> float:
    n = a.numel()
    s = 0.0
    pairs = 0
    for i in range(n):
        for j in range(i + 1, n):
            s += float(torch.sign(a[i] - a[j]) * torch.sign(b[i] - b[j]))
            pairs += 1
    return s / pairs if pairs else 1.0


def compare(gp: torch.Tensor, gt: torch.Tensor, keep: torch.Tensor) -> dict:
    """The agreement measures of the module docstring for two gradients of the alphas; ``keep``
    marks the operations the method can choose. Edges where either gradient is (close to) zero, below
    1e-3 of the whole gradient's norm (a saturated Gumbel softmax), are left out of the per-edge
    measures (``edges`` counts those kept)."""
    cos = float(torch.nn.functional.cosine_similarity(gp.flatten(), gt.flatten(), dim=0))
    edge_cos, top, kend, sign = [], [], [], []
    floor = 1e-3 * float(max(gp.norm(), gt.norm()))
    for e in range(gp.shape[0]):
        k = keep[e]
        p, t = gp[e][k], gt[e][k]
        if not (p.norm() > floor and t.norm() > floor):
            continue
        edge_cos.append(float(torch.nn.functional.cosine_similarity(p, t, dim=0)))
        top.append(int(p.argmin()) == int(t.argmin()))
        kend.append(_kendall(-p, -t))
        sign.append(float((torch.sign(p) == torch.sign(t)).double().mean()))
    mean = lambda v: statistics.fmean(v) if v else float("nan")  # noqa: E731
    return {"cosine": cos, "edges": len(edge_cos), "edge_cosine": mean(edge_cos), "top_agree": mean(top),
            "kendall": mean(kend), "sign_agree": mean(sign)}


def run(method: str, seed: int, budget: Q.Budget, every: int, log=print) -> dict:
    measurements = []
    twin_holder, sums = {}, {}

    def on_step(step, model, m, train_batch, val_batch):
        if step % every:
            return
        plain = copy.deepcopy(model)
        if "twin" not in twin_holder:
            twin_holder["twin"] = Q.build(method, "topo", budget, in_channels=plain.stem[0].in_channels)
        twin = twin_holder["twin"]
        load_plain_into(twin, plain)
        twin.tau = plain.tau
        for p_t, p_p in zip(twin.parameters(), plain.parameters()):
            if not torch.equal(p_t, p_p):
                raise AssertionError("the topo twin's parameters differ from the plain supernet's")
        x, y = val_batch
        gp, gp_total, lp = arch_grad(plain, m, x, y, seed * 100003 + step)
        gt, gt_total, lt = arch_grad(twin, m, x, y, seed * 100003 + step)
        keep = plain.mask & torch.tensor([n not in plain.exclude for n in plain.space.names])
        sums["plain"] = sums.get("plain", 0) + gp
        sums["topo"] = sums.get("topo", 0) + gt
        row = {"step": step, "epoch": step // budget.steps() + 1, "loss_plain": lp, "loss_topo": lt,
               **compare(gp, gt, keep),
               "cumulative_cosine": float(torch.nn.functional.cosine_similarity(
                   sums["plain"].flatten(), sums["topo"].flatten(), dim=0)),
               "grad_plain": gp.tolist(), "grad_topo": gt.tolist(), "genotype": model.genotype()}
        if gp_total is not None:  # the method's architecture loss (regularizer included)
            row["cosine_with_regularizer"] = float(torch.nn.functional.cosine_similarity(
                gp_total.flatten(), gt_total.flatten(), dim=0))
        measurements.append(row)
        log(f"step {step}: cosine {row['cosine']:+.3f}, edges agree on the favoured op {row['top_agree']:.2f}, "
            f"kendall {row['kendall']:+.2f}, loss plain {lp:.3f} topo {lt:.3f}")

    result = Q.search(method, "plain", seed, budget, on_step=on_step)
    return {"method": method, "seed": seed, "budget": Q.dataclasses.asdict(budget), "every": every,
            "genotype": result["genotype"], "seconds": result["seconds"], "measurements": measurements}


def table(record: dict) -> str:
    reg = any("cosine_with_regularizer" in r for r in record["measurements"])
    lines = ["| step | epoch | cosine | cumulative | " + ("with regularizer | " if reg else "") + "mean edge cosine (edges) | "
             "favoured op agrees | Kendall tau | signs agree | loss plain / topo |",
             "|---|---|---|---|" + ("---|" if reg else "") + "---|---|---|---|---|"]
    for r in record["measurements"]:
        extra = f"{r.get('cosine_with_regularizer', float('nan')):+.3f} | " if reg else ""
        lines.append(f"| {r['step']} | {r['epoch']} | {r['cosine']:+.3f} | {r['cumulative_cosine']:+.3f} | {extra}{r['edge_cosine']:+.3f} ({r['edges']}) "
                     f"| {r['top_agree']:.2f} | {r['kendall']:+.2f} | {r['sign_agree']:.2f} | {r['loss_plain']:.3f} / {r['loss_topo']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="darts", choices=sorted(Q.METHOD_CLASSES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=int, default=16, help="measure every N steps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON file for the measurements (default bench/search_direction_METHOD.json)")
    Q.add_budget_arguments(ap, epochs=8)
    args = ap.parse_args(argv)
    if args.every < 1:
        raise SystemExit(f"--every: expected a positive integer, got {args.every}")
    torch.set_num_threads(args.threads)
    budget = Q.budget_from_args(args)
    record = run(args.method, args.seed, budget, args.every, log=lambda s: print(s, file=sys.stderr, flush=True))
    record["info"] = H.run_info(torch.device("cpu"))
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = Path(args.out or H.REPO / "bench" / f"search_direction_{args.method}.json")
    from toponas_kernels._io import atomic_write_json

    atomic_write_json(out, record, indent=1)
    print(table(record))
    print(f"\nderived cell of the plain search: {record['genotype']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
