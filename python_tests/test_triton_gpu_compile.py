"""Every Triton kernel of the three families compiled for a real GPU target (sm_90) without a
GPU, with the specializations a real launch gives it. The interpreter runs their logic on the CPU
but never meets the GPU compiler, whose type and layout errors would otherwise first show on a
GPU machine.

How: the tests run under TRITON_INTERPRET=1 (conftest), where kernels cannot be compiled, so a
child process without it runs this file as a script. There ``JITFunction.run`` is replaced by a
recorder that binds each launch's arguments with Triton's own binder for an sm_90 target (the
code a real launch runs: an int equal to 1 becomes a constexpr, ints and pointers divisible by
16 get a divisibility attribute, dtypes and constexprs as passed) and compiles that
specialization instead of running it. The launchers are called on small CPU tensors with the
launch sizes of a GPU and the shapes the package uses (depthwise I = 1, a single output
channel, 1x1 spatial rows, K = 12 and 17 candidates, 16-multiples); their outputs are garbage,
only compilation counts. The child prints one JSON record per compiled specialization.
"""

import json
import os
import subprocess
import sys

import pytest


def _install_recorder(compiled: dict):
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binders = {}

    def run(self, *args, grid, warmup, **kwargs):
        # As JITFunction.run, minus the device: bind and specialize, pack, compile (no launch).
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        if self not in binders:
            binders[self] = create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binders[self](*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, options)
        key = (self.fn.__name__, str(signature), str(sorted(constexprs.items())), str(sorted(attrs.items())), str(options))
        if key in compiled:
            return
        kernel = triton.compile(ASTSource(self, signature, constexprs, attrs), target=target, options=options.__dict__)
        assert kernel.asm.get("cubin"), f"{self.fn.__name__}: no machine code"
        names = [p.name for p in self.params]
        compiled[key] = {
            "kernel": self.fn.__name__,
            # Runtime arguments the specialization turned into constexprs (ints equal to 1).
            "ones": sorted(names[path[0]] for path in constexprs if not self.params[path[0]].is_constexpr),
            "divisible": sorted(names[path[0]] for path, a in attrs.items() if "tt.divisibility" in str(a)),
        }

    JITFunction.run = run


def compile_all() -> list:
    import torch

    compiled: dict = {}
    _install_recorder(compiled)
    from toponas_kernels.ops import merge as G
    from toponas_kernels.ops import mixed as M
    from toponas_kernels.ops import shuffle as S

    def mixed(shape, k, dtype):
        ys = [torch.randn(shape, dtype=dtype) for _ in range(k)]
        w = torch.randn(k, dtype=dtype)
        M._mixed_sum_triton(ys, w)
        M._mixed_sum_backward_triton(torch.randn(shape, dtype=dtype), ys, w)

    def merge(O, I, sizes, dils, normalize, dtype):
        kernels = [torch.randn(O, I, s, s, dtype=dtype) for s in sizes]
        w = torch.randn(len(sizes), dtype=dtype)
        merged = G._merge_triton(kernels, w, dils, normalize, 1e-5)
        G._merge_backward_triton(torch.randn_like(merged), kernels, w, dils, normalize, 1e-5)

    def shuffles(shape, processed, groups, dtype):
        x = torch.randn(shape, dtype=dtype)
        S._channel_shuffle_triton(x, groups)
        S._partial_channel_shuffle_triton(x[:, :processed], x[:, processed:], groups)
        S._partial_channel_unshuffle_triton(x, processed, groups)

    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for k in (3, 9):  # one chunk, and a running sum across chunks
            mixed((2, 3, 5), k, dtype)
        logits = torch.randn(4, 6, dtype=dtype)
        M._masked_softmax_triton(logits, torch.ones(4, 6, dtype=torch.bool), 0.5)
        M._masked_softmax_backward_triton(logits, logits, 0.5)
        for normalize in ("channel", "tensor", "none"):
            for sizes, dil in (([3, 5], [1, 2]), ([1, 3, 5, 3, 7], [1, 1, 1, 2, 1])):
                merge(4, 3, sizes, dil, normalize, dtype)
        shuffles((2, 8, 3, 5), 2, 4, dtype)
    # The package's shapes (in float32: the dtypes' code paths are compiled above).
    for dtype in (torch.float32,):
        mixed((2, 16, 8, 8), 17, dtype)  # 16-multiples; chunks starting at k0 = 8 and 16
        for rows, k in ((14, 8), (6, 5), (3, 1)):  # DARTS and NB201 alphas, a single candidate
            logits = torch.randn(rows, k, dtype=dtype)
            M._masked_softmax_triton(logits, torch.ones(rows, k, dtype=torch.bool), 1.0)
            M._masked_softmax_backward_triton(logits, logits, 1.0)
        for normalize in ("channel", "tensor"):
            merge(16, 1, [3, 5, 3, 5], [1, 1, 2, 2], normalize, dtype)  # DARTS depthwise
            merge(16, 16, [1, 3], [1, 1], normalize, dtype)  # NB201 full convs
            merge(1, 1, [3, 5], [1, 2], normalize, dtype)  # one output channel
            merge(16, 1, [(3, 5, 7)[i % 3] for i in range(12)], [1] * 12, normalize, dtype)  # exaggerated
            merge(16, 1, [3] * 17, [1] * 17, normalize, dtype)  # chunks from k0 = 4 .. 16
        shuffles((2, 16, 1, 1), 4, 4, dtype)  # 1x1 rows: channel stride 1
        shuffles((1, 16, 8, 8), 4, 4, dtype)  # batch 1, partial channels 1/4 (PC-DARTS)
        shuffles((2, 4, 3, 3), 1, 4, dtype)  # channels / groups = 1
    return list(compiled.values())


@pytest.mark.slow  # minutes of cold Triton compiles; CI runs it under -m slow and in the CPU-only build
def test_triton_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's package
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    names = {r["kernel"] for r in records}
    for kernel in ("_mixed_sum_fwd_kernel", "_mixed_sum_bwd_kernel", "_masked_softmax_fwd_kernel",
                   "_masked_softmax_bwd_kernel", "_merge_fwd_kernel", "_merge_bwd_kernel",
                   "_merge_stats_kernel", "_permute_rows_kernel"):  # fmt: skip
        assert kernel in names, sorted(names)
    ones = {(r["kernel"], a) for r in records for a in r["ones"]}
    divisible = {(r["kernel"], a) for r in records for a in r["divisible"]}
    # The specializations a real launch makes, each compiled at least once: ints equal to 1 as
    # constexprs (depthwise I, one output channel, one candidate, a 1x1 row's channel stride) ...
    for want in (("_merge_fwd_kernel", "I"), ("_merge_bwd_kernel", "I"), ("_merge_stats_kernel", "I"),
                 ("_merge_fwd_kernel", "O"), ("_merge_bwd_kernel", "O"), ("_masked_softmax_fwd_kernel", "K"),
                 ("_masked_softmax_bwd_kernel", "K"), ("_permute_rows_kernel", "src0_sc"),
                 ("_permute_rows_kernel", "CG")):  # fmt: skip
        assert want in ones, (want, sorted(ones))
    # ... and 16-divisible ints and pointers.
    for want in (("_mixed_sum_fwd_kernel", "n"), ("_mixed_sum_fwd_kernel", "k0"), ("_mixed_sum_bwd_kernel", "n"),
                 ("_mixed_sum_fwd_kernel", "out_ptr"), ("_merge_fwd_kernel", "O"), ("_merge_fwd_kernel", "x0"),
                 ("_permute_rows_kernel", "C"), ("_masked_softmax_fwd_kernel", "x_ptr")):  # fmt: skip
        assert want in divisible, (want, sorted(divisible))


if __name__ == "__main__":
    records = compile_all()
    for record in records:
        print(json.dumps(record))
    print(f"compiled {len(records)} kernel specializations for sm_90", file=sys.stderr)
