#!/usr/bin/env bash
# The torch versions matrix: for each (torch, triton) pair, a fresh venv with that pair and the
# package's declared dependencies, a build of a clean copy of the repository (git archive of REF),
# and a fast test subset that covers every op, backend and search method. Too long for .ci/run
# (several GB of downloads and one CUDA build per pair); the last results are kept in
# docs/TORCH_VERSIONS.md.
#
#   bash .ci/torch_versions.sh [--pairs 2.11.0:3.6.0,2.15.0:3.9.0] [--dir DIR] [--out FILE] [--ref REF] [--no-cuda]
#
# --dir   where the venvs, source copies and logs go (env TOPONAS_TORCH_VERSIONS_DIR, default /tmp);
#         a venv DIR/toponas-torch-<torch> that exists is reused (pip then installs nothing new)
# --out   the results file (default DIR/toponas-torch-versions.md), one Markdown table row per pair
# --ref   the commit to test (default HEAD; uncommitted changes are not tested)
# --no-cuda  build CPU + Triton only (TOPONAS_NO_CUDA=1) even where the CUDA kernels would compile:
#         the tests are the same (nothing CUDA runs here), the build minutes instead of most of an
#         hour; use it when csrc/ has not changed since the last run that compiled the CUDA kernels
# env     MAX_JOBS (default 1) and NICE (default 15) for the build and the tests; CUDA_HOME
#         (default /usr/local/cuda); PYTHON (default python3) makes the venvs.
#
# The CUDA kernels are compiled (for sm_80 and sm_90) when the venv's torch is a CUDA build whose
# CUDA major equals nvcc's; otherwise the build is CPU + Triton only (TOPONAS_NO_CUDA=1). The
# results say which. This machine's pip config caps torch at the releases on its disk
# (/etc/xdg/pip/constraints.txt): the venvs' pip commands lift the cap with PIP_CONSTRAINT=/dev/null,
# for themselves only.
#
# The test subset (a few minutes per pair on 2 cores; no GPU here, so the CUDA cases skip and the
# Triton kernels run in the interpreter):
#   ops        test_mixed, test_merge, test_shuffle, test_fused_mixed_op, test_forms, test_engine_pins,
#              test_cuda_vector: every op on the reference, C++ and Triton (interpreter) backends
#   GPU code   test_triton_gpu_compile: every Triton kernel compiled for sm_90 by this triton
#   compile    torch.compile of a masked TopoNAS step (one graph) and of a GDAS step
#   methods    one TopoNAS search per method on NAS-Bench-201 (darts, darts2, pc-darts, beta-darts,
#              gdas, rome), a plain search on the DARTS space, and `toponas train` end to end
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
DIR=${TOPONAS_TORCH_VERSIONS_DIR:-/tmp}
PAIRS="2.11.0:3.6.0,2.15.0:3.9.0"
OUT=""
REF=HEAD
NO_CUDA=0
while [ $# -gt 0 ]; do
  case "$1" in
    --pairs) PAIRS=${2:?--pairs needs a value like 2.11.0:3.6.0,2.15.0:3.9.0}; shift 2 ;;
    --dir) DIR=${2:?--dir needs a directory}; shift 2 ;;
    --out) OUT=${2:?--out needs a file}; shift 2 ;;
    --ref) REF=${2:?--ref needs a commit}; shift 2 ;;
    --no-cuda) NO_CUDA=1; shift ;;
    -h|--help) sed -n '2,/^[^#]/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "torch_versions.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$DIR/toponas-torch-versions.md}
export MAX_JOBS=${MAX_JOBS:-1} PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
NICE=${NICE:-15}
CUDA_HOME_DEFAULT=${CUDA_HOME:-/usr/local/cuda}
PYTHON=${PYTHON:-python3}
COMMIT=$(git -C "$REPO" rev-parse --verify --quiet "$REF^{commit}") || { echo "torch_versions.sh: --ref '$REF' is not a commit" >&2; exit 2; }
mkdir -p "$DIR"

TESTS=(
  python_tests/test_mixed.py python_tests/test_merge.py python_tests/test_shuffle.py
  python_tests/test_fused_mixed_op.py python_tests/test_forms.py python_tests/test_engine_pins.py
  python_tests/test_cuda_vector.py
  python_tests/test_triton_gpu_compile.py
  "python_tests/test_compile.py::test_topo_step_is_one_graph_with_eager_values[darts-mask]"
  python_tests/test_compile.py::test_gdas_step_compiles_a_bounded_number_of_graphs
  "python_tests/test_search.py::test_search_end_to_end[nb201-darts-topo-None]"
  "python_tests/test_search.py::test_search_end_to_end[nb201-darts2-topo-None]"
  "python_tests/test_search.py::test_search_end_to_end[nb201-pc-darts-topo-None]"
  "python_tests/test_search.py::test_search_end_to_end[nb201-beta-darts-topo-None]"
  "python_tests/test_search.py::test_search_end_to_end[nb201-gdas-topo-None]"
  "python_tests/test_search.py::test_search_end_to_end[nb201-rome-topo-None]"
  "python_tests/test_search.py::test_search_end_to_end[darts-darts-plain-None]"
  python_tests/test_train.py::test_cli_train_end_to_end_writes_every_file
)

nvcc_major=""
if [ -x "$CUDA_HOME_DEFAULT/bin/nvcc" ]; then
  nvcc_major=$("$CUDA_HOME_DEFAULT/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
fi

cell() { tr '|\n' '/ ' <<<"$1" | sed 's/ *$//'; }  # one Markdown table cell

{
  echo "<!-- written by .ci/torch_versions.sh -->"
  echo "Commit \`$(git -C "$REPO" rev-parse --short "$COMMIT")\`, $(date -u +%Y-%m-%d), $(nproc) cores, no GPU, nvcc ${nvcc_major:-none} ($CUDA_HOME_DEFAULT), Python $($PYTHON -c 'import platform; print(platform.python_version())')."
  echo
  echo "| torch | triton | torch's CUDA | declared pin admits it | build | pytest (subset) | install / build / tests (s) |"
  echo "| --- | --- | --- | --- | --- | --- | --- |"
} >"$OUT"

status=0
IFS=, read -r -a PAIR_LIST <<<"$PAIRS"
for pair in "${PAIR_LIST[@]}"; do
  tv=${pair%%:*}
  trv=${pair#*:}
  if [ -z "$tv" ] || [ -z "$trv" ] || [ "$tv" = "$pair" ]; then
    echo "torch_versions.sh: --pairs entry '$pair' is not TORCH:TRITON" >&2; exit 2
  fi
  venv=$DIR/toponas-torch-$tv
  src=$DIR/toponas-src-$tv
  log=$DIR/toponas-torch-$tv.log
  : >"$log"
  echo "== torch $tv + triton $trv: venv $venv, log $log"

  t0=$(date +%s)
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  py=$venv/bin/python
  # The package's declared dependencies, torch replaced by the pair's: the matrix tests the
  # package against torch versions that its pin may not admit yet (that is what it decides).
  mapfile -t deps < <("$py" - "$REPO/pyproject.toml" <<'PY'
import re, sys, tomllib
for dep in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]:
    if re.match(r"torch\b(?![-_.\w])", dep) is None:
        print(dep)
PY
)
  pin=$("$py" - "$REPO/pyproject.toml" <<'PY'
import re, sys, tomllib
for dep in tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]:
    if re.match(r"torch\b(?![-_.\w])", dep):
        print(dep)
PY
)
  # Triton's CPU interpreter before 3.8 turns a one-element array into an int with int(), which
  # numpy 2.4 refuses (every interpreted kernel with a range() over program ids fails there): the
  # tests run Triton in that interpreter, so an older triton gets a numpy it can run with.
  old_triton=$("$PYTHON" -c "import sys; print(1 if tuple(map(int, sys.argv[1].split('.')[:2])) < (3, 8) else 0)" "$trv")
  [ "$old_triton" = 1 ] && deps+=('numpy<2.4')
  if ! PIP_CONSTRAINT=/dev/null nice -n "$NICE" "$py" -m pip install -q "torch==$tv" "triton==$trv" \
      "${deps[@]}" ninja 'setuptools>=77' wheel packaging pytest >>"$log" 2>&1; then
    echo "| $tv | $trv | - | - | install failed: $(cell "$(tail -1 "$log")") | - | - |" >>"$OUT"
    status=1; continue
  fi
  admits=$("$py" -c "import sys; from packaging.requirements import Requirement as R; print('yes' if R(sys.argv[1]).specifier.contains(sys.argv[2], prereleases=True) else 'no')" "$pin" "$tv")
  torch_cuda=$("$py" -c "import torch; print(torch.version.cuda or '')")
  t1=$(date +%s)

  rm -rf "$src" && mkdir -p "$src"
  git -C "$REPO" archive --format=tar "$COMMIT" | tar -x -C "$src"
  build_env=(MAX_JOBS="$MAX_JOBS")
  if [ "$NO_CUDA" = 0 ] && [ -n "$torch_cuda" ] && [ "${torch_cuda%%.*}" = "$nvcc_major" ]; then
    build_env+=(CUDA_HOME="$CUDA_HOME_DEFAULT" TORCH_CUDA_ARCH_LIST="8.0;9.0")
  else
    build_env+=(TOPONAS_NO_CUDA=1)
  fi
  echo "   build: ${build_env[*]}"
  if ! (cd "$src" && env "${build_env[@]}" nice -n "$NICE" "$py" -m pip install -v --no-build-isolation --no-deps . >>"$log" 2>&1); then
    echo "| $tv | $trv | ${torch_cuda:-cpu} | $admits ($pin) | build failed ($(cell "${build_env[*]}")): $(cell "$(grep -m1 -E 'error|Error' "$log" || tail -1 "$log")") | - | $((t1 - t0)) / - / - |" >>"$OUT"
    status=1; continue
  fi
  t2=$(date +%s)
  info=$(cd / && "$py" -m toponas_kernels.info --json)
  echo "$info" >"$DIR/toponas-torch-$tv.info.json"
  built=$("$py" -c "import json, sys; i = json.loads(sys.argv[1]); b = i['build']; print(('CUDA (sm ' + str(b.get('arch_list')) + ') + ' if i['cuda_built'] else 'CPU only + ') + 'C++ ' + ('loaded' if i['cpp_loaded'] else 'NOT loaded') + '; ' + str(b.get('reason', '')))" "$info")

  # From the source copy's root as CI does; the pytest script (not python -m pytest) imports the
  # installed package with its compiled _C. Compile caches per pair: a cold compile is tested.
  set +e
  (cd "$src" && TOPONAS_REQUIRE_EXT=1 TORCHINDUCTOR_CACHE_DIR="$DIR/toponas-inductor-$tv" \
     TRITON_CACHE_DIR="$DIR/toponas-triton-$tv" nice -n "$NICE" "$venv/bin/pytest" -q -p no:cacheprovider \
     "${TESTS[@]}" >>"$log" 2>&1)
  rc=$?
  set -e
  t3=$(date +%s)
  summary=$(grep -E '^=*.* (passed|failed|error|errors|skipped|no tests ran)( |,|=|$)' "$log" | tail -1 | sed 's/^=* *//; s/ *=*$//')
  [ "$rc" -eq 0 ] || status=1
  echo "| $tv | $trv | ${torch_cuda:-cpu} | $admits ($pin) | $(cell "$built") | $(cell "${summary:-pytest exit $rc}") | $((t1 - t0)) / $((t2 - t1)) / $((t3 - t2)) |" >>"$OUT"
  echo "   $summary"
done

{
  echo
  echo "Test subset: $(printf '%s ' "${TESTS[@]}" | sed 's/python_tests\///g')"
} >>"$OUT"
cat "$OUT"
exit $status
