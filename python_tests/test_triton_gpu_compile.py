"""The Triton kernels of family 1 compiled for a real GPU target (sm_90) without a GPU: the
interpreter runs their logic on the CPU but never meets the GPU compiler, whose type and layout
errors would otherwise first show on a GPU machine. The tests run under TRITON_INTERPRET=1
(conftest), where kernels cannot be compiled, so the compiling happens in a child process
without it: this file run as a script."""

import inspect
import os
import subprocess
import sys

import pytest

DTYPES = ["fp32", "fp16", "bf16", "fp64"]


def _compile(triton, fn, signature, constexprs):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = dict(signature)
    for name in constexprs:
        signature[name] = "constexpr"
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
    assert kernel.asm.get("cubin"), f"{fn.__name__}: no machine code"


def compile_all() -> int:
    import triton
    import triton.language as tl

    from toponas_kernels.ops import mixed as M

    count = 0
    for dtype in DTYPES:
        acc = tl.float64 if dtype == "fp64" else tl.float32
        acc_ptr = "*fp64" if dtype == "fp64" else "*fp32"
        fwd = list(inspect.signature(M._mixed_sum_fwd_kernel.fn).parameters)
        bwd = list(inspect.signature(M._mixed_sum_bwd_kernel.fn).parameters)
        for num in (1, 8):
            sig = {name: f"*{dtype}" for name in fwd[:11]}
            sig.update(acc_ptr=acc_ptr, n="i64", k0="i32")
            for accumulate, final in ((False, True), (True, False)):
                _compile(triton, M._mixed_sum_fwd_kernel, sig, dict(NUM=num, ACCUMULATE=accumulate, FINAL=final, BLOCK=1024, ACC=acc))
            sig = {name: f"*{dtype}" for name in bwd if name not in ("NUM", "BLOCK", "ACC")}
            sig.update(part_ptr=acc_ptr, n="i64", nprog="i64", k0="i32")
            _compile(triton, M._mixed_sum_bwd_kernel, sig, dict(NUM=num, BLOCK=1024, ACC=acc))
            count += 3
        sig = {"x_ptr": f"*{dtype}", "m_ptr": "*u8", "p_ptr": f"*{dtype}", "K": "i32", "inv_tau": "fp32"}
        _compile(triton, M._masked_softmax_fwd_kernel, sig, dict(BLOCK_K=8, ACC=acc))
        sig = {"g_ptr": f"*{dtype}", "p_ptr": f"*{dtype}", "gx_ptr": f"*{dtype}", "K": "i32", "inv_tau": "fp32"}
        _compile(triton, M._masked_softmax_bwd_kernel, sig, dict(BLOCK_K=16, ACC=acc))
        count += 2
    return count


def test_family1_triton_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    if "ptxas" in result.stderr and result.returncode != 0 and "not found" in result.stderr.lower():
        pytest.skip("no ptxas for sm_90 on this machine")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled 32 kernels" in result.stdout, result.stdout


if __name__ == "__main__":
    print(f"compiled {compile_all()} kernels for sm_90")
