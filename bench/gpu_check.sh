#!/usr/bin/env bash
# The one command a session with a GPU runs first, from the checkout's root:
#
#   bash bench/gpu_check.sh                 # on the GPU machine: results into $OUT (or --out DIR)
#   bash bench/gpu_check.sh --dry-run       # on a CPU: the phases that can run here, the rest listed
#
# Phases, each in its own process under timeout(1), all within one budget (default 540 s, so the
# run fits 9 minutes): environment record; in-place build (sm_<the GPU's capability>, 9.0 by
# default; MAX_JOBS = cores; CUDA_HOME found); the CUDA-marked tests in isolated pytest processes
# (one sticky CUDA error fails only its own process); every op at large shapes on both GPU
# backends against float64; a torch.compile probe on CUDA tensors;
# bench/search_step.py --device cuda --batch 64 plain / topo / topo --merge separable; the
# compiled-Triton tests (cold compiles: after the cheaper phases); bench/ops.py --quick; last, a
# 2-cell topo step eager and with CUDA graphs (--cuda-graphs), what the budget cuts first.
#
# Written after every phase, so a run cut short still reports what finished (at most 4 files):
#   gpu_check.json        per phase: status (ok/failed/timeout/skipped/not_run), seconds, box,
#                         key numbers; the environment
#   gpu_check_summary.md  the same as markdown tables, ready for bench/RESULTS.md
#   gpu_check.log         every phase's output
#   ops_quick.csv         bench/ops.py rows in the columns of bench/results.csv
#
# Options: --out DIR; --dry-run; --budget SECONDS; --phases a,b,c (run only these; the others are
# recorded as skipped); -h. Environment: GPU_CHECK_TIMEOUT_<PHASE>=SECONDS shortens or widens one
# phase's box (e.g. GPU_CHECK_TIMEOUT_TESTS_TRITON=300); PYTHON (default python3).
# Exit status: 0 when every phase that ran passed, 1 when one failed or was cut, 2 on bad usage.

set -u
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
PY=${PYTHON:-python3}
DRY=0
OUT_DIR=${OUT:-}
BUDGET=
ONLY=

usage() { sed -n '2,26p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_check.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) [ $# -ge 2 ] || die "--out needs a directory"; OUT_DIR=$2; shift ;;
        --out=*) OUT_DIR=${1#--out=} ;;
        --budget) [ $# -ge 2 ] || die "--budget needs seconds"; BUDGET=$2; shift ;;
        --budget=*) BUDGET=${1#--budget=} ;;
        --phases) [ $# -ge 2 ] || die "--phases needs a comma list"; ONLY=$2; shift ;;
        --phases=*) ONLY=${1#--phases=} ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done
[ -n "$OUT_DIR" ] || die "no output folder: pass --out DIR (or set OUT)"
if [ -z "$BUDGET" ]; then BUDGET=$([ $DRY = 1 ] && echo 600 || echo 540); fi
case "$BUDGET" in ''|*[!0-9]*) die "--budget must be a whole number of seconds, got '$BUDGET'" ;; esac
command -v "$PY" >/dev/null || die "no $PY on PATH (set PYTHON)"
command -v timeout >/dev/null || die "timeout(1) is missing (coreutils)"

G=("$PY" "$HERE/gpu_check.py")
ALL=$("${G[@]}" phases) || die "bench/gpu_check.py does not run with $PY"
if [ -n "$ONLY" ]; then
    for p in ${ONLY//,/ }; do
        case " $ALL " in *" $p "*) ;; *) die "--phases: unknown phase '$p'; expected some of: $ALL" ;; esac
    done
fi
mkdir -p "$OUT_DIR" || die "cannot create $OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
export PYTHONUNBUFFERED=1
cd "$REPO"
"${G[@]}" init --out "$OUT_DIR" --budget "$BUDGET" $([ $DRY = 1 ] && echo --dry-run) || die "cannot write $OUT_DIR"
START=$(date +%s)
RESERVE=5   # seconds kept for the last record
FAILED=0

selected() { [ -z "$ONLY" ] || case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

skip() {  # skip NAME REASON
    "${G[@]}" record --out "$OUT_DIR" --phase "$1" --status skipped --reason "$2"
    echo "=== $1: skipped ($2)" | tee -a "$LOG"
}

phase() {  # phase NAME BOX_SECONDS COMMAND...: run under its time box, record the outcome
    local name=$1 box=$2 var left rc t0 t1 secs
    shift 2
    selected "$name" || { skip "$name" "not selected (--phases $ONLY)"; return 0; }
    var="GPU_CHECK_TIMEOUT_$(echo "$name" | tr '[:lower:]' '[:upper:]')"
    box=${!var:-$box}
    left=$(( START + BUDGET - RESERVE - $(date +%s) ))
    if [ "$left" -lt 3 ]; then
        "${G[@]}" record --out "$OUT_DIR" --phase "$name" --status not_run --reason "the ${BUDGET} s budget was spent"
        echo "=== $name: not run (budget spent)" | tee -a "$LOG"
        return 0
    fi
    [ "$box" -le "$left" ] || box=$left
    echo "=== $name (box ${box} s): $*" | tee -a "$LOG"
    t0=$(date +%s.%N)
    timeout -k 5 "$box" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
    cat "$WORK/$name.log" >>"$LOG"
    "${G[@]}" record --out "$OUT_DIR" --phase "$name" --rc "$rc" --seconds "$secs" --timeout "$box" \
        --log "$WORK/$name.log" --result "$WORK/$name.json" --elapsed $(( $(date +%s) - START ))
    echo "=== $name: exit $rc after ${secs} s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || FAILED=1
}

# ---------------------------------------------------------------------------- environment
phase env 30 "${G[@]}" env --result "$WORK/env.json"

if [ $DRY = 1 ]; then
    NO_GPU="dry run: needs a GPU"
    # One thread per process: OpenMP threads spinning against other work on a small shared CPU
    # make tiny steps many times slower.
    export OMP_NUM_THREADS=1
    # The package as installed here (editable or not); nothing is rebuilt.
    phase build 60 "${G[@]}" build --result "$WORK/build.json"
    skip tests_cuda_vector "$NO_GPU (the CUDA-marked tests skip on a CPU)"
    skip tests_cuda "$NO_GPU (the CUDA-marked tests skip on a CPU)"
    phase large_shapes 120 "${G[@]}" large --device cpu --result "$WORK/large_shapes.json"
    # aot_eager: dynamo's capture and AOTAutograd's graphs without inductor's C++ code generation,
    # which takes minutes on a small CPU (GPU_CHECK_COMPILE_BACKEND=inductor to include it)
    phase compile_probe 120 "${G[@]}" compile --device cpu --backend "${GPU_CHECK_COMPILE_BACKEND:-aot_eager}" \
        --result "$WORK/compile_probe.json"
    SMALL=(--device cpu --batch 2 --repeats 1 --C 4 --cells 2 --image-size 8 --threads 1 --no-counts --json)
    phase search_plain 120 "$PY" bench/search_step.py "${SMALL[@]}" --mode plain
    phase search_topo 120 "$PY" bench/search_step.py "${SMALL[@]}" --mode topo
    phase search_separable 120 "$PY" bench/search_step.py "${SMALL[@]}" --mode topo --merge separable
    skip tests_triton "$NO_GPU (compiled Triton)"
    phase ops_quick 120 "$PY" bench/ops.py --quick --device cpu --no-compile --ops mixed_sum,channel_shuffle \
        --threads 1 --json --csv "$OUT_DIR/ops_quick.csv"
    skip search_topo_small "$NO_GPU (measured beside the CUDA-graphs step)"
    skip search_graphs_small "$NO_GPU (CUDA graphs)"
else
    # ------------------------------------------------------------------------ build in place
    CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ')
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-${CAP:-9.0}}
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    if [ -z "${CUDA_HOME:-}" ]; then
        if [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda
        elif command -v nvcc >/dev/null; then CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")"); export CUDA_HOME
        fi
    fi
    export TOPONAS_FORCE_CUDA=1   # on a GPU machine a build without CUDA kernels is a failure
    # The in-place build is what every later phase imports (the source tree, not an older install).
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    phase build 240 bash -c '"$1" setup.py build_ext --inplace && "$1" bench/gpu_check.py build --expect-cuda --result "$2"' \
        _ "$PY" "$WORK/build.json"
    # ------------------------------------------------------------------------ tests
    PYTEST=("$PY" -m pytest -v -p no:cacheprovider -rfE --color=no)   # PYTHONPATH: the in-place build
    phase tests_cuda_vector 60 "${PYTEST[@]}" -m cuda python_tests/test_cuda_vector.py
    # bench/ops.py on the GPU is the ops_quick phase below: not run twice
    phase tests_cuda 90 "${PYTEST[@]}" -m cuda -k "not triton" python_tests --ignore=python_tests/test_cuda_vector.py \
        --deselect python_tests/test_bench.py::test_quick_run_gpu
    phase large_shapes 90 "${G[@]}" large --device cuda --result "$WORK/large_shapes.json"
    phase compile_probe 90 "${G[@]}" compile --device cuda --result "$WORK/compile_probe.json"
    phase search_plain 45 "$PY" bench/search_step.py --device cuda --batch 64 --mode plain --json
    phase search_topo 45 "$PY" bench/search_step.py --device cuda --batch 64 --mode topo --json
    phase search_separable 45 "$PY" bench/search_step.py --device cuda --batch 64 --mode topo --merge separable --json
    phase tests_triton 180 "${PYTEST[@]}" -m cuda -k triton python_tests
    phase ops_quick 90 "$PY" bench/ops.py --quick --device cuda --json --csv "$OUT_DIR/ops_quick.csv"
    # Last, so the budget cuts them first: a topo step with CUDA graphs (--cuda-graphs), on a
    # 2-cell network so that inductor's compile fits the box, and the same network eager beside it
    phase search_topo_small 45 "$PY" bench/search_step.py --device cuda --batch 64 --cells 2 --mode topo --no-counts --json
    phase search_graphs_small 150 "$PY" bench/search_step.py --device cuda --batch 64 --cells 2 --mode topo --cuda-graphs --json
fi

rm -f "$OUT_DIR/ops_quick.csv.lock"   # bench/ops.py's lock beside its CSV
"${G[@]}" finish --out "$OUT_DIR" --elapsed $(( $(date +%s) - START ))
rc=$?
[ $FAILED = 0 ] || rc=1
exit $rc
