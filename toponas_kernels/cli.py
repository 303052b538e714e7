"""The ``toponas`` command (also ``python -m toponas_kernels``).

    toponas simplify --space darts            # Table II: module counts per stage, and the graphs
    toponas simplify --space darts --json     # {"stages": [{"name", "conv", "non_conv", "total"}]}
    toponas simplify --space exaggerated --num-sep-dil 5 --num-double-sep 7 --stride 2
    toponas simplify --space darts --C 64 --device cuda --merge auto   # the form of each merged conv
    toponas spaces                            # the built-in spaces, op by op, as module chains
    toponas search --space nb201 --method darts --topo topo --dataset fashion-mnist --epochs 5 --out runs/a
    toponas lookup --arch '|nor_conv_3x3~0|+|...|' --table NAS-Bench-201-v1_1-096897.pth [--dataset cifar100]
    toponas lookup --arch '|nor_conv_3x3~0|+|...|' --table analog-nasbench   # offline: one retrain, CIFAR-10 test only
    toponas train --genotype runs/a/result.json --dataset fashion-mnist --epochs 200 --out runs/a-train
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
        group = simp.merged_shape(node) + (f" s{node.stride}" if node.stride != 1 else "") + f" {{{names}}}"
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


_SEARCH_EPILOG = """\
methods and spaces: every method runs on darts, nb201 and exaggerated (and on a user-declared
SearchSpace from Python). Refused: --partial-channels with gdas or rome (they run one sampled
path per edge). On nb201, pc-darts has no edge normalization (NB201 cells keep every edge) and
rome searches operations only (no topology to disentangle). A mask file must match the space's
operations and the supernet's edges.

Every hyperparameter left unset takes the method's reference value for the space (see
docs/SEARCH.md), e.g. pc-darts: batch 256, lr 0.1, arch lr 6e-4, 15 warm-up epochs.
"""


def _float_pair(text: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers, got {text!r}") from None
    return a, b


def _options() -> dict[str, dict]:
    """Every option of ``search``, ``train`` and ``plan``, declared once: flag -> add_argument
    keywords. A command takes the options it has by flag (``_add``), with its own help where the
    meaning differs between commands."""
    from .search.config import MASK_RULES, MERGES, METHODS, SPACES, TOPO_MODES

    datasets = "cifar10, cifar100, imagenet16-120, fashion-mnist or synthetic"
    return {
        # what to search
        "--space": dict(required=True, help=f"search space: {', '.join(SPACES)}, or module:NAME of a SearchSpace"),
        "--network": dict(choices=("darts", "nb201"), default=None,
                          help="supernet skeleton for a module:NAME space (default darts)"),
        "--method": dict(required=True, choices=METHODS, metavar="METHOD", help=f"search method: {', '.join(METHODS)}"),
        "--topo": dict(default="plain", choices=TOPO_MODES, metavar="MODE",
                       help=f"TopoNAS mode: {', '.join(TOPO_MODES)} (default plain: the method as published); "
                            "the mode= of the supernets and FusedMixedOp"),
        "--no-kernel-norm": dict(dest="kernel_norm", action="store_false",
                                 help="switch kernel normalization of merged kernels off (the paper's ablation)"),
        "--merge": dict(default="auto", choices=MERGES,
                        help="form of merged conv groups in --topo topo: auto (default: the cheaper exact form), dense, "
                             "stacked (exact), separable (faster approximation, exact for one-hot weights)"),
        "--recompute-cells": dict(action="store_true",
                                  help="DARTS-space network: keep only each cell's inputs for backward and run the cells "
                                       "again there (about half the peak memory of --topo topo again, steps 1.2-1.4x longer)"),
        "--compile": dict(nargs="?", const=True, default=False, metavar="BACKEND",
                          help="torch.compile each step's forward and loss (default backend inductor; recompilation capped "
                               "for sampled sub-networks); see README on when it helps"),
        "--cuda-graphs": dict(action="store_true",
                              help="compile each step with inductor's mode reduce-overhead: CUDA graphs replay the step's "
                                   "kernels without per-op launches (CUDA only; softmax methods with fixed masks are one "
                                   "graph)"),
        "--mask": dict(default=None, help="Zero-One-Shot mask: random, zero-shot, or a mask.json/result.json to reuse"),
        "--mask-level": dict(type=float, default=0.5, help="pruning level xi in (0, 1) (default 0.5)"),
        "--mask-rule": dict(default="operations", choices=MASK_RULES,
                            help="zero-shot stopping rule: share of operations kept (default) or Algorithm 1's literal "
                                 "ratio of architectures"),
        "--mask-batches": dict(type=int, default=3, help="zero-shot: batches of images for the ranking (default 3)"),
        "--mask-batch-size": dict(type=int, default=128, help="zero-shot: images per batch (default 128)"),
        "--mask-inits": dict(type=int, default=3, help="zero-shot: proxy initializations averaged (default 3)"),
        # what to train
        "--genotype": dict(required=True, help="result.json, Genotype(...) string, published name or NB201 string"),
        # data
        "--dataset": dict(required=True, help=datasets),
        "--data-dir": dict(default=None, help="where the dataset's files are"),
        "--train-portion": dict(type=float, default=0.5, help="share of the training set for the weights (default 0.5)"),
        "--train-size": dict(type=int, default=None, help="use only the first N training images (quick runs)"),
        "--test-size": dict(type=int, default=None, help="evaluate on the first N test images only (quick runs)"),
        "--channels": dict(type=int, default=None, choices=(1, 3), help="fashion-mnist: 1 or 3 channels (default 3)"),
        "--num-workers": dict(type=int, default=None, help="data loader workers (default 0 on CPU, 4 on GPU)"),
        "--cutout": dict(type=int, default=None, help="cutout side (DARTS 16; 0: none)"),
        # schedule
        "--epochs": dict(type=int, required=True, help="search epochs"),
        "--steps-per-epoch": dict(type=int, default=None, help="cut every epoch after N steps (smoke runs)"),
        "--batch-size": dict(type=int, default=None),
        "--lr": dict(type=float, default=None, help="weight learning rate (cosine schedule)"),
        "--lr-min": dict(type=float, default=None),
        "--momentum": dict(type=float, default=None),
        "--nesterov": dict(action=argparse.BooleanOptionalAction, default=None),
        "--weight-decay": dict(type=float, default=None),
        "--grad-clip": dict(type=float, default=None),
        "--arch-lr": dict(type=float, default=None),
        "--arch-weight-decay": dict(type=float, default=None),
        "--arch-betas": dict(type=_float_pair, default=None, help="Adam betas of the architecture step, e.g. 0.5,0.999"),
        "--warmup-epochs": dict(type=int, default=None, help="epochs without architecture steps (pc-darts: 15)"),
        "--partial-channels": dict(type=int, default=None, help="PC-DARTS' k (pc-darts: 4)"),
        "--beta-lambda": dict(type=float, default=None, help="beta-darts: lambda per epoch (0.5)"),
        "--tau-max": dict(type=float, default=None, help="gdas/rome: initial Gumbel temperature (10)"),
        "--tau-min": dict(type=float, default=None, help="gdas/rome: final Gumbel temperature (0.1)"),
        "--rome-samples": dict(type=int, default=None, help="rome: sub-networks per iteration (7)"),
        "--init-channels": dict(type=int, default=None, help="supernet channels C (16)"),
        "--layers": dict(type=int, default=None, help="DARTS: cells (8); NB201: cells per stage (5)"),
        "--aux-weight": dict(type=float, default=None, help="auxiliary head loss weight (DARTS 0.4; 0: no head)"),
        "--drop-path": dict(type=float, default=None, help="final drop-path probability, linear from 0 (DARTS 0.2)"),
        # memory budget
        "--memory-budget": dict(default=None, help="fit the search into this much memory, e.g. 6GiB (measures two small "
                                                   "steps first)"),
        "--fit-by": dict(default="batch", choices=("batch", "pc", "mask"),
                         help="what to shrink when the search does not fit: batch size (default), partial-channel k, "
                              "or mask level"),
        # run
        "--out": dict(required=True, help="folder for result.json, logs, pictures and the checkpoint"),
        "--resume": dict(action="store_true", help="continue the search in --out from its last checkpoint"),
        "--seed": dict(type=int, default=0),
        "--deterministic": dict(action="store_true", help="deterministic GPU algorithms (same seed, same result)"),
        "--device": dict(default="auto", help="auto (default), cpu, cuda or cuda:N"),
        "--checkpoint-every": dict(type=int, default=0, help="also checkpoint every N steps (default: every epoch)"),
        "--no-progress": dict(dest="progress", action="store_false", help="no progress bars"),
        "--no-plots": dict(dest="plots", action="store_false", help="no arch_weights.png / cell.png at the end"),
        "--threads": dict(type=int, default=None, help="CPU threads for torch (default: torch's choice)"),
        "--json": dict(action="store_true", help="print the result as JSON on stdout"),
        "--then-train": dict(action="store_true",
                             help="retrain the derived cell from scratch afterwards (toponas train, into OUT/train)"),
        "--train-epochs": dict(type=int, default=None,
                               help="with --then-train: retraining epochs (default: the space's reference, DARTS 600, "
                                    "NB201 200)"),
        "--lookup": dict(default=None, metavar="TABLE",
                         help="nb201: add the derived cell's NAS-Bench-201 accuracies (hp 200, every dataset) to "
                              "result.json; 'analog-nasbench': CIFAR-10 test accuracy from that package's one 200-epoch "
                              "retrain, not NB201's table"),
    }


def _add(group, options: dict[str, dict], *flags: str, **override) -> None:
    """Add the options ``flags`` of the table to ``group``; ``override`` replaces keywords (of a
    single flag), e.g. a command's own help."""
    if override and len(flags) != 1:
        raise TypeError("override: only with a single flag")
    for flag in flags:
        group.add_argument(flag, **{**options[flag], **override})


_SCHEDULE = ("--epochs", "--steps-per-epoch", "--batch-size", "--lr", "--lr-min", "--momentum", "--nesterov",
             "--weight-decay", "--grad-clip")


def _add_search_args(p: argparse.ArgumentParser) -> None:
    o = _options()
    _add(p.add_argument_group("what to search"), o, "--space", "--network", "--method", "--topo", "--no-kernel-norm",
         "--merge", "--recompute-cells", "--compile", "--cuda-graphs", "--mask", "--mask-level", "--mask-rule", "--mask-batches",
         "--mask-batch-size", "--mask-inits")
    _add(p.add_argument_group("data"), o, "--dataset", "--data-dir", "--train-portion", "--train-size", "--channels",
         "--num-workers")
    _add(p.add_argument_group("schedule (unset: the method's reference value)"), o, *_SCHEDULE, "--arch-lr",
         "--arch-weight-decay", "--arch-betas", "--warmup-epochs", "--partial-channels", "--beta-lambda", "--tau-max",
         "--tau-min", "--rome-samples", "--init-channels", "--layers")
    _add(p.add_argument_group("memory budget"), o, "--memory-budget", "--fit-by")
    _add(p.add_argument_group("run"), o, "--out", "--resume", "--seed", "--deterministic", "--device",
         "--checkpoint-every", "--no-progress", "--no-plots", "--threads", "--json", "--then-train", "--train-epochs",
         "--lookup")


def _space_arg(text: str):
    if ":" not in text:
        return text
    import importlib

    module, _, name = text.partition(":")
    try:
        space = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--space {text}: cannot import {name} from {module} ({exc})") from None
    if not isinstance(space, S.SearchSpace):
        raise ValueError(f"--space {text}: {name} is a {type(space).__name__}, not a SearchSpace")
    return space


def _cmd_search(args) -> int:
    from .search import SearchConfig, run

    fields = {k: v for k, v in vars(args).items() if k not in ("func", "command", "json", "then_train", "train_epochs")}
    fields["space"] = _space_arg(args.space)
    if args.train_epochs is not None and not args.then_train:
        raise ValueError("--train-epochs: only used with --then-train")
    result = run(SearchConfig(**fields))
    if not result:  # a data-parallel rank other than 0: rank 0 reports
        return 0
    if args.json and not args.then_train:
        print(json.dumps(result))
    else:
        print(result["genotype_text"])
    if args.then_train:
        import os

        from .train import TrainConfig, train

        epochs = args.train_epochs if args.train_epochs is not None else (200 if result["space"] == "nb201" else 600)
        trained = train(TrainConfig(
            genotype=os.path.join(args.out, "result.json"), dataset=args.dataset, data_dir=args.data_dir,
            channels=args.channels, epochs=epochs, out=os.path.join(args.out, "train"), seed=args.seed,
            resume=args.resume, deterministic=args.deterministic, device=args.device, progress=args.progress,
            plots=args.plots, threads=args.threads,
        ))
        if args.json:
            print(json.dumps({"search": result, "train": trained}))
        else:
            print(f"retrained: params {trained['params'] / 1e6:.6f} M  test accuracy {trained['test_accuracy']:.2f}%  "
                  f"best {trained['best_accuracy']:.2f}%")
    return 0


def _cmd_lookup(args) -> int:
    from .lookup import lookup

    r = lookup(args.arch, args.table, dataset=args.dataset, hp=args.hp)
    if args.json:
        print(json.dumps(r))
        return 0

    def pct(v):
        return f"{v:7.2f}" if v is not None else f"{'-':>7}"

    best = r["best"]
    if "label" in r:  # the offline table: test accuracy only, no index
        print(f"{r['label']} ({r['table']})")
        print(f"{'':<6} {'test':>7}  arch")
        print(f"{'arch':<6} {pct(r['test_accuracy'])}  {r['arch']}")
        print(f"{'best':<6} {pct(best['test_accuracy'])}  {best['arch']}")
        print(f"(a cell drawn at random: mean {r['random_cell']['mean']:.2f}, median {r['random_cell']['median']:.2f})")
        return 0
    print(f"{r['dataset']}, hp {r['hp']}: {r['table']} ({r['api']})")
    print(f"{'':<6} {'index':>6} {'train':>7} {'valid':>7} {'test':>7}  arch")
    print(f"{'arch':<6} {r['index']:>6} {pct(r['train_accuracy'])} {pct(r['valid_accuracy'])} "
          f"{pct(r['test_accuracy'])}  {r['arch']}")
    print(f"{'best':<6} {best['index']:>6} {pct(None)} {pct(best['valid_accuracy'])} "
          f"{pct(best['test_accuracy'])}  {best['arch']}")
    valid = f"valid = {r['valid_split']}, " if r["valid_split"] else "no valid split, "
    print(f"({valid}test = {r['test_split']}; mean of {r['trials']} trial(s); best: {best['selected_by']}; "
          f"highest test accuracy in the table {pct(best['max_test_accuracy']).strip()})")
    return 0


_TRAIN_EPILOG = """\
--genotype: a toponas search result.json (or its folder), a DARTS Genotype(...) string, a
published cell (DARTS_V1, DARTS_V2, PC_DARTS, GDAS, BETA_DARTS) or a NAS-Bench-201 string
'|op~0|+|op~0|op~1|+|op~0|op~1|op~2|'. Options left unset take the space's reference value:
DARTS: 20 cells, C 36, batch 96, SGD 0.025 cosine, wd 3e-4, clip 5, auxiliary 0.4, drop-path
0.2, cutout 16 (600 epochs in the papers); NB201: 5 cells per stage, C 16, batch 256, SGD
nesterov 0.1 cosine, wd 5e-4 (200 epochs). Search then train in one line:
  toponas search ... --out runs/a && toponas train --genotype runs/a --dataset D --epochs N --out runs/a-train
"""


def _add_train_args(p: argparse.ArgumentParser) -> None:
    o = _options()
    g = p.add_argument_group("what to train")
    _add(g, o, "--genotype")
    _add(g, o, "--init-channels", help="C (DARTS 36, NB201 16)")
    _add(g, o, "--layers", help="DARTS: cells (20); NB201: cells per stage (5)")

    g = p.add_argument_group("data")
    _add(g, o, "--dataset", "--data-dir", "--train-size", "--test-size", "--channels")
    _add(g, o, "--num-workers", help="data loader workers (default 0)")
    _add(g, o, "--cutout")

    g = p.add_argument_group("schedule (unset: the space's reference value)")
    _add(g, o, "--epochs", help="training epochs (papers: DARTS 600, NB201 200)")
    _add(g, o, *(f for f in _SCHEDULE[1:] if f not in ("--lr", "--grad-clip")))
    _add(g, o, "--lr", help="initial learning rate (cosine schedule)")
    _add(g, o, "--grad-clip", help="gradient norm clip (DARTS 5; 0: none)")
    _add(g, o, "--aux-weight", "--drop-path")

    g = p.add_argument_group("run")
    _add(g, o, "--out", help="folder for result.json, train_log.csv, curves.png and the checkpoint")
    _add(g, o, "--resume", help="continue the training in --out from its last checkpoint")
    _add(g, o, "--seed")
    _add(g, o, "--deterministic", help="deterministic GPU algorithms")
    _add(g, o, "--device", "--checkpoint-every", "--no-progress")
    _add(g, o, "--no-plots", help="no curves.png / cell.png at the end")
    _add(g, o, "--threads", "--json")


def _cmd_train(args) -> int:
    from .train import TrainConfig, train

    fields = {k: v for k, v in vars(args).items() if k not in ("func", "command", "json")}
    result = train(TrainConfig(**fields))
    if not result:  # a data-parallel rank other than 0: rank 0 reports
        return 0
    if args.json:
        print(json.dumps(result))
    else:
        print(f"params {result['params'] / 1e6:.6f} M (with auxiliary head {result['params_with_aux'] / 1e6:.6f} M)  "
              f"test accuracy {result['test_accuracy']:.2f}%  best {result['best_accuracy']:.2f}%")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage mistakes answered in one line (and a non-zero exit), not a usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _cmd_plan(args) -> int:
    from .search import SearchConfig
    from .search.budget import fit, format_bytes, parse_bytes, plan

    cfg = SearchConfig(
        space=_space_arg(args.space), network=args.network, method=args.method, topo=args.topo,
        kernel_norm=args.kernel_norm, mask=args.mask, mask_level=args.mask_level, dataset=args.dataset,
        batch_size=args.batch, partial_channels=args.partial_channels, init_channels=args.init_channels,
        layers=args.layers, device=args.device, threads=args.threads, epochs=1,
    )
    if args.mask not in (None, "random", "zero-shot"):
        raise ValueError("--mask: plan takes random or zero-shot (planned as a random mask of the same level)")
    log = None if args.json else (lambda m: print(m, file=sys.stderr))
    if args.memory_budget is None:
        out = plan(cfg, log=log)
    else:
        _, out = fit(cfg, parse_bytes(args.memory_budget), args.fit_by, log=log)
    if args.json:
        print(json.dumps(out))
        return 0
    step = out.get("predicted_step_seconds")
    step = "" if step is None else f", step {step:.3f} s"
    if args.memory_budget is None:
        print(f"batch {out['batch_size']}: predicted peak {format_bytes(out['predicted_peak_bytes'])}{step}")
        return 0
    chosen = ", ".join(f"{k} {v}" for k, v in out["chosen"].items()) or "fits as requested"
    print(f"batch {out['requested_batch_size']}: predicted peak {format_bytes(out['requested_predicted_peak_bytes'])}")
    print(f"budget {format_bytes(out['budget_bytes'])}: {chosen}; predicted peak {format_bytes(out['predicted_peak_bytes'])}{step}")
    return 0


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    o = _options()
    _add(p, o, "--space", "--network", "--method", "--topo", "--no-kernel-norm")
    _add(p, o, "--mask", help="random or zero-shot (planned as a random mask of the same level)")
    _add(p, o, "--mask-level")
    _add(p, o, "--dataset", required=False, default="cifar10",
         help="only its image shape and classes are used (default cifar10)")
    p.add_argument("--batch", "--batch-size", dest="batch", type=int, default=None, help="batch size (default: the method's)")
    _add(p, o, "--partial-channels", "--init-channels", "--layers", "--device", "--threads")
    _add(p, o, "--memory-budget", help="also say what fits into this much memory, e.g. 6GiB")
    _add(p, o, "--fit-by")
    _add(p, o, "--json", help="print the prediction as JSON on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="toponas", description="TopoNAS kernels: tools")
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

    p = sub.add_parser(
        "search", help="run an architecture search (DARTS, PC-DARTS, beta-DARTS, GDAS, ROME; TopoNAS; masks)",
        epilog=_SEARCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_search_args(p)
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("plan", help="predict a search's peak memory and step time (and what fits a budget) without searching")
    _add_plan_args(p)
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("lookup", help="NAS-Bench-201 accuracies of an architecture, from the benchmark's table")
    p.add_argument("--arch", required=True, help="NB201 architecture string, e.g. '|nor_conv_3x3~0|+|...|'")
    p.add_argument("--table", required=True,
                   help="NAS-Bench-201-v1_*.pth, or a NATS-tss .pickle.pbz2 file or -simple folder (never downloaded); "
                        "or analog-nasbench (pip install --no-deps analog-nasbench): one 200-epoch retrain per cell, "
                        "CIFAR-10 test accuracy only, not NAS-Bench-201's table")
    p.add_argument("--dataset", default=None,
                   help="cifar10-valid (default), cifar10 (train+valid, test only), cifar100 or ImageNet16-120; "
                        "analog-nasbench: cifar10 only")
    p.add_argument("--hp", default="200", help="training epochs of the table's runs: 200 (default, as papers report) or 12")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cmd_lookup)

    p = sub.add_parser(
        "train", help="retrain a searched cell from scratch (DARTS evaluation network or NAS-Bench-201 network)",
        epilog=_TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_train_args(p)
    p.set_defaults(func=_cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # ConfigError, MaskError, DataError are ValueErrors
        print(f"toponas: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        hint = f"; continue with the same command and --resume (checkpoint in {out})" if out else ""
        print(f"toponas: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
