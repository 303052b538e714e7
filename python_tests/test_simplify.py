"""The simplification engine (toponas_kernels/nas/simplify.py) and ``toponas simplify``:
module counts per stage (paper Table II and hand-derived ones), the structure of the simplified
graphs, name independence, recursion, determinism."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from toponas_kernels.nas import spaces as S
from toponas_kernels.nas.simplify import Choice, Leaf, Merged, count, simplify, stages

ROOT = Path(__file__).resolve().parents[1]


def _counts(space, stride=1):
    return {name: (c.conv, c.non_conv, c.total) for name, _, c in stages(space, stride)}


def test_darts_counts_match_paper_table_ii():
    assert _counts(S.DARTS_SPACE) == {
        "original": (6, 14, 20),
        "pms": (6, 8, 14),
        "fms": (6, 6, 12),
        "reparam": (3, 6, 9),
    }
    assert [name for name, _, _ in stages(S.DARTS_SPACE)] == ["original", "pms", "fms", "reparam"]


def test_darts_stride2_counts():
    # skip_connect is ReLU -> FactorizedReduce -> BN at stride 2 (+1 conv, +2 non-conv); it joins
    # the conv group (shares its ReLU and BN) but is never merged.
    assert _counts(S.DARTS_SPACE, 2) == {
        "original": (7, 16, 23),
        "pms": (7, 8, 15),
        "fms": (7, 6, 13),
        "reparam": (4, 6, 10),
    }


def test_nb201_counts_hand_derived():
    # original: nor_conv_1x1 and 3x3 are ReLU-Conv-BN (2 conv, 4 non-conv) + avg_pool (1 non-conv)
    # pms: the two nor_convs share ReLU and BN -> 2 + 1 non-conv; no FMS (no two-layer op)
    # reparam: conv1x1 and conv3x3 merge into one 3x3 conv
    assert _counts(S.NB201_SPACE) == {
        "original": (2, 5, 7),
        "pms": (2, 3, 5),
        "fms": (2, 3, 5),
        "reparam": (1, 3, 4),
    }


@pytest.mark.parametrize("n_dil, n_sep", [(5, 7), (1, 1), (3, 1), (0, 4), (2, 0), (2, 3)])
def test_exaggerated_counts_follow_the_rule(n_dil, n_sep):
    """N dil convs (ReLU, conv, BN), M sep convs (twice ReLU, conv, BN), two pools (+BN), skip:
    original: N + 2M conv, 2 + 2N + 4M non-conv.
    pms: all N + M convs share one ReLU and one BN; each sep keeps its inner BN, ReLU.
    fms: with M >= 2 the seps share their inner (BN, ReLU) once.
    reparam: the dil convs merge into 1 conv; with M >= 2 each sep layer's weighted sum merges
    into 1 conv (2 in all); a lone sep keeps its 2 convs."""
    n, m = n_dil, n_sep
    pools, shared = 2, 2
    inner_pms = 2 * m
    inner_fms = 2 if m >= 2 else 2 * m
    expected = {
        "original": (n + 2 * m, pools + 2 * n + 4 * m),
        "pms": (n + 2 * m, pools + shared + inner_pms),
        "fms": (n + 2 * m, pools + shared + inner_fms),
        "reparam": (min(n, 1) + 2 * min(m, 1), pools + shared + inner_fms),
    }
    got = {k: v[:2] for k, v in _counts(S.exaggerated_space(n, m)).items()}
    assert got == expected


def test_exaggerated_paper_setting():
    assert _counts(S.exaggerated_space(5, 7)) == {
        "original": (19, 40, 59),
        "pms": (19, 18, 37),
        "fms": (19, 6, 25),
        "reparam": (3, 6, 9),
    }


def test_user_space_triple_stacked_needs_recursive_fms():
    """A user-declared space of two triple-stacked separable convs: FMS must recurse into its
    own second stage to share both inner (BN, ReLU) pairs."""
    def triple(k):
        unit = (S.ReLU(), S.Conv(k, separable=True), S.BN())
        return S.OpDef(f"triple_{k}", unit * 3)

    space = S.SearchSpace("triples", [triple(3), triple(5), S.OpDef("skip", [S.Identity()])])
    assert _counts(space) == {
        "original": (6, 12, 18),
        "pms": (6, 10, 16),  # outer ReLU, BN shared; 2 x 4 inner
        "fms": (6, 6, 12),  # outer 2 + (BN, ReLU) twice
        "reparam": (3, 6, 9),  # first, second and third layers merged
    }


def test_user_space_trailing_only_and_mixed_kinds():
    space = S.SearchSpace(
        "trailing",
        [
            S.OpDef("c3", [S.Conv(3), S.BN()]),
            S.OpDef("s5", [S.Conv(5, separable=True), S.BN()]),
            S.OpDef("g3", [S.Conv(3, groups=2), S.BN()]),
            S.OpDef("pool", [S.Pool("avg", 3)]),
        ],
    )
    # pms: one BN for c3, s5, g3. reparam: c3 and s5 are both groups-1 convs (a dw+pw unit is
    # a dense conv) and merge; g3 has groups 2 and is folded alone.
    assert _counts(space) == {
        "original": (3, 4, 7),
        "pms": (3, 2, 5),
        "fms": (3, 2, 5),
        "reparam": (2, 2, 4),
    }


def test_interleaved_merge_groups():
    """Two merge groups whose branches interleave (stride-1 and grouped convs) both merge."""
    chains = [
        (S.Conv(3),),
        (S.Conv(3, groups=2),),
        (S.Pool("max", 3),),
        (S.Conv(5, groups=2),),
        (S.Conv(5, dilation=2, separable=True),),
    ]
    g = simplify(chains)
    kinds = [(b.members, type(b.node).__name__) for b in g.root.branches]
    assert kinds == [((0, 4), "Merged"), ((1, 3), "Merged"), ((2,), "Seq")]
    assert [p.owners[0][0] for p in g.root.branches[0].node.parts] == [0, 4]
    assert g.root.branches[1].node.groups == 2 and g.root.branches[0].node.size == 9


def test_names_do_not_matter():
    renamed = S.SearchSpace("renamed", [S.OpDef(f"op{i}", op.modules, op.reduce) for i, op in enumerate(S.DARTS_SPACE)])
    assert _counts(renamed) == _counts(S.DARTS_SPACE)
    assert _counts(renamed, 2) == _counts(S.DARTS_SPACE, 2)
    # reordering the candidates changes nothing either
    shuffled = S.DARTS_SPACE.subset(reversed(S.DARTS_PRIMITIVES))
    assert _counts(shuffled) == _counts(S.DARTS_SPACE)


def test_darts_topo_graph_structure():
    space = S.DARTS_SPACE
    g = simplify(space.chains(1), names=space.names)
    idx = {n: i for i, n in enumerate(space.names)}
    assert g.zeros == (idx["none"],)
    root = g.root
    assert root.top and len(root.branches) == 4
    pools_skip = [b.members for b in root.branches[:3]]
    assert pools_skip == [(1,), (2,), (3,)]
    assert root.branches[2].node.items == []  # skip_connect: identity
    group = root.branches[3]
    assert group.members == (4, 5, 6, 7)
    relu, inner, bn = group.node.items
    assert isinstance(relu, Leaf) and relu.module == S.ReLU() and relu.owners == ((4, 0), (5, 0), (6, 0), (7, 0))
    assert isinstance(bn, Leaf) and bn.module == S.BN() and len(bn.owners) == 4
    assert isinstance(inner, Choice) and not inner.top and inner.scope == (4, 5, 6, 7)
    fms_branch, dil_branch = inner.branches
    assert dil_branch.folded and isinstance(dil_branch.node, Merged)
    assert [p.owners for p in dil_branch.node.parts] == [((6, 1),), ((7, 1),)]
    assert dil_branch.node.size == 9
    stage1, m_bn, m_relu, stage2 = fms_branch.node.items
    assert fms_branch.members == (4, 5)
    assert (m_bn.module, m_relu.module) == (S.BN(), S.ReLU())
    assert m_bn.owners == ((4, 2), (5, 2)) and m_relu.owners == ((4, 3), (5, 3))
    for stage, pos in ((stage1, 1), (stage2, 4)):
        assert isinstance(stage, Choice) and stage.scope == (4, 5)
        (b,) = stage.branches
        assert b.folded and [p.owners for p in b.node.parts] == [((4, pos),), ((5, pos),)]
        assert b.node.size == 5


def test_active_mask_leaves_candidates_out():
    space = S.DARTS_SPACE
    active = [n in ("max_pool_3x3", "sep_conv_3x3", "dil_conv_5x5") for n in space.names]
    g = simplify(space.chains(1), active=active)
    # max_pool; sep3 and dil5 still share ReLU and BN; sep3 keeps its inner BN, ReLU (no other
    # sep to float them with); sep3's 2 convs + dil5's folded conv
    assert tuple(count(g)) == (3, 5)
    all_members = sorted(i for b in g.root.branches for i in b.members)
    assert all_members == [i for i, a in enumerate(active) if a]
    with pytest.raises(ValueError, match="mask"):
        simplify(space.chains(1), active=[True])


def test_pms_only_and_fms_only():
    chains = S.DARTS_SPACE.chains(1)
    assert tuple(count(simplify(chains, fms=False, reparam=False))) == (6, 8)
    # FMS alone (Table VI row): the seps float their inner (BN, ReLU) once: 14 - 2 non-conv
    assert tuple(count(simplify(chains, pms=False, reparam=False))) == (6, 12)
    assert tuple(count(simplify(chains, pms=False, fms=False, reparam=False))) == (6, 14)


def test_deterministic_and_printable():
    a = simplify(S.DARTS_SPACE.chains(2), names=S.DARTS_SPACE.names, stride=2).format()
    b = simplify(S.DARTS_SPACE.chains(2), names=S.DARTS_SPACE.names, stride=2).format()
    assert a == b
    assert "merged conv5x5 d2 s2" in a and "(shared by 5)" in a and "factorized_reduce" in a
    assert "left out (zero): none" in a


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "toponas_kernels", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )


def test_cli_json_darts():
    res = _cli("simplify", "--space", "darts", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [(s["name"], s["conv"], s["non_conv"], s["total"]) for s in out["stages"]] == [
        ("original", 6, 14, 20),
        ("pms", 6, 8, 14),
        ("fms", 6, 6, 12),
        ("reparam", 3, 6, 9),
    ]


@pytest.mark.slow
def test_cli_text_and_other_spaces():
    res = _cli("simplify", "--space", "exaggerated", "--num-sep-dil", "2", "--num-double-sep", "3", "--stride", "2")
    assert res.returncode == 0, res.stderr
    assert "reparam" in res.stdout and "== reparam ==" in res.stdout and "merged conv" in res.stdout
    res = _cli("simplify", "--space", "nb201", "--json")
    assert [s["total"] for s in json.loads(res.stdout)["stages"]] == [7, 5, 5, 4]
    res = _cli("simplify", "--space", "darts", "--primitives", "sep_conv_3x3,nope")
    assert res.returncode == 2 and "primitives" in res.stderr
