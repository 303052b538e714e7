"""Every Triton kernel of the three families compiled for a real GPU target (sm_90) without a
GPU. The interpreter runs their logic on the CPU but never meets the GPU compiler, whose type
and layout errors would otherwise first show on a GPU machine.

How: the tests run under TRITON_INTERPRET=1 (conftest), where kernels cannot be compiled, so a
child process without it runs this file as a script. There ``JITFunction.run`` is replaced by a
recorder that compiles each launch's actual signature and constexprs (what the launchers pass
for a GPU: GPU block sizes, chunk sizes, dtypes) for sm_90 instead of running it, and the
launchers are called on small CPU tensors. Their outputs are garbage; only compilation counts.
"""

import inspect
import os
import subprocess
import sys

import pytest

_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "uint8": "u8",
           "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64"}  # fmt: skip


def _install_recorder(compiled: list):
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    target = GPUTarget("cuda", 90, 32)

    def run(self, *args, grid, warmup, **kwargs):
        names = {p.name for p in self.params}
        options = {k: kwargs.pop(k) for k in list(kwargs) if k not in names}  # num_warps, ...
        bound = inspect.signature(self.fn).bind(*args, **kwargs)
        bound.apply_defaults()
        signature, constexprs = {}, {}
        for param in self.params:
            value = bound.arguments[param.name]
            if param.is_constexpr:
                signature[param.name] = "constexpr"
                constexprs[param.name] = value
            elif isinstance(value, torch.Tensor):
                signature[param.name] = "*" + _DTYPES[str(value.dtype).removeprefix("torch.")]
            elif isinstance(value, bool):
                signature[param.name] = "i1"
            elif isinstance(value, int):
                signature[param.name] = "i64" if abs(value) >= 2**31 else "i32"
            elif isinstance(value, float):
                signature[param.name] = "fp32"
            else:
                raise TypeError(f"{self.fn.__name__}: unexpected argument {param.name}={value!r}")
        key = (
            self.fn.__name__,
            tuple(sorted(signature.items())),
            tuple(sorted((k, str(v)) for k, v in {**constexprs, **options}.items())),
        )
        if key not in compiled:
            source = ASTSource(fn=self, signature=signature, constexprs=constexprs)
            kernel = triton.compile(source, target=target, options=options)
            assert kernel.asm.get("cubin"), f"{self.fn.__name__}: no machine code"
            compiled.append(key)

    JITFunction.run = run


def compile_all() -> list:
    import torch

    compiled: list = []
    _install_recorder(compiled)
    from toponas_kernels.ops import merge as G
    from toponas_kernels.ops import mixed as M
    from toponas_kernels.ops import shuffle as S

    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for k in (3, 9):  # one chunk, and a running sum across chunks
            ys = [torch.randn(2, 3, 5, dtype=dtype) for _ in range(k)]
            w = torch.randn(k, dtype=dtype)
            M._mixed_sum_triton(ys, w)
            M._mixed_sum_backward_triton(torch.randn(2, 3, 5, dtype=dtype), ys, w)
        logits = torch.randn(4, 6, dtype=dtype)
        mask = torch.ones(4, 6, dtype=torch.bool)
        M._masked_softmax_triton(logits, mask, 0.5)
        M._masked_softmax_backward_triton(logits, logits, 0.5)
        for normalize in ("channel", "tensor", "none"):
            for sizes, dil in (([3, 5], [1, 2]), ([1, 3, 5, 3, 7], [1, 1, 1, 2, 1])):
                kernels = [torch.randn(4, 3, s, s, dtype=dtype) for s in sizes]
                w = torch.randn(len(sizes), dtype=dtype)
                merged = G._merge_triton(kernels, w, dil, normalize, 1e-5)
                G._merge_backward_triton(torch.randn_like(merged), kernels, w, dil, normalize, 1e-5)
        x = torch.randn(2, 8, 3, 5, dtype=dtype)
        S._channel_shuffle_triton(x, 4)
        S._partial_channel_shuffle_triton(x[:, :2], x[:, 2:], 4)
        S._partial_channel_unshuffle_triton(x, 2, 4)
    return compiled


def test_triton_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's package
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    names = set(result.stdout.split())
    for kernel in ("_mixed_sum_fwd_kernel", "_mixed_sum_bwd_kernel", "_masked_softmax_fwd_kernel",
                   "_masked_softmax_bwd_kernel"):  # fmt: skip
        assert kernel in names, result.stdout
    assert any("merge" in n for n in names) and len(names) >= 7, result.stdout


if __name__ == "__main__":
    keys = compile_all()
    print(" ".join(sorted({name for name, *_ in keys})))
    print(f"compiled {len(keys)} kernel specializations for sm_90", file=sys.stderr)
