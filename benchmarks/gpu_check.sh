#!/usr/bin/env bash
# The whole device check (issue 19) in one run of at most 8 minutes on an H200:
#   1. the machine and versions                           -> $OUT/env.txt
#   2. the GPU tests (pytest -m gpu, tests/test_gpu.py)   -> $OUT/gpu-tests.xml, gpu-tests.jsonl
#   3. workload (b), ResNet-50, against Quantus and bare compute, GPU busy share
#                                                         -> $OUT/results-gpu.md
#   4. workload (c), ViT-B/16, against Quantus            -> $OUT/results-gpu-vit.md
#   5. peak memory and GPU busy of whole runs             -> $OUT/memory.md
# and everything it printed -> $OUT/check.log (7 files in all). Each step has its own time limit
# and writes as it goes, so a step cut off or failing leaves the others' results: one run is
# always useful. Exit status: the number of steps that failed.
#
# On the lent GPU (device tool; the wheels of what the machine lacks travel in .whl/, the
# trained digits model in .cache/):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".cache"], timeout_s=540)
# Rehearsal on the CPU, the same steps on tiny sizes:
#   OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh --device cpu --quick
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
QUICK=0
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --quick) QUICK=1; shift ;;
        *) echo "usage: gpu_check.sh [--device cuda|cpu] [--quick]" >&2; exit 2 ;;
    esac
done
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
LOG="$OUT/check.log"
FAILED=0
export PYTHONUNBUFFERED=1 SALIENCYCHECK_CACHE="$PWD/.cache"

say() { echo "== $(date -u +%T) $*" | tee -a "$LOG"; }
# step NAME SECONDS COMMAND...: run it under a time limit, its output into the log
step() {
    local name=$1 limit=$2 start=$SECONDS status
    shift 2
    say "$name (limit ${limit} s)"
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    status=$?
    say "$name: exit $status after $((SECONDS - start)) s$([ $status = 124 ] && echo ', cut off at its limit')"
    [ $status = 0 ] || FAILED=$((FAILED + 1))
}

# -- what the device machine lacks: carried wheels, installed outside its environment --------
if ! $PYTHON -c "import pydantic, captum, quantus" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1
then
    say "installing $(ls .whl | wc -l) carried wheels"
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 || say "wheel install failed"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the project from the working tree

{
    date -u
    nvidia-smi 2>&1 || echo "no nvidia-smi"
    $PYTHON - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs")
for name in ("torchvision", "numpy", "scipy", "scikit-image", "pydantic", "captum", "quantus",
             "typer", "rich", "pytest"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "MISSING")
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >>"$LOG"

# time limits of the steps (s): tests, (b), (c), memory; 460 s in all on the GPU
if [ $QUICK = 1 ]; then  # the CPU rehearsal: tiny sizes, but two slow cores
    LIMITS=(900 300 300 120); BENCH_ARGS=(--quick --repeat 1); MEMORY_IMAGES=(2)
else
    LIMITS=(160 150 110 40); BENCH_ARGS=(--repeat 1 --images 16 --stages 19)
    MEMORY_IMAGES=(8 64)
fi

# -- 2. GPU tests: CUDA maps and runs equal the CPU's ----------------------------------------
rm -f "$OUT/gpu-tests.jsonl"
step "GPU tests" "${LIMITS[0]}" env SALIENCYCHECK_GPU_DEVICE="$DEVICE" \
    SALIENCYCHECK_GPU_REPORT="$OUT/gpu-tests.jsonl" \
    $PYTHON -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider -rs \
    --junitxml="$OUT/gpu-tests.xml"

# -- 3. workload (b): ResNet-50 against Quantus, naive and minimal bare compute --------------
step "benchmark (b) ResNet-50" "${LIMITS[1]}" $PYTHON benchmarks/bench.py --workload b --device "$DEVICE" \
    "${BENCH_ARGS[@]}" --no-agreement --no-memory --output "$OUT/results-gpu.md"

# -- 4. workload (c): ViT-B/16 against Quantus ------------------------------------------------
step "benchmark (c) ViT-B/16" "${LIMITS[2]}" $PYTHON benchmarks/bench.py --workload c --device "$DEVICE" \
    "${BENCH_ARGS[@]}" --stages 10 --no-agreement --no-memory --output "$OUT/results-gpu-vit.md"

# -- 5. whole runs: peak memory, chunk size, GPU busy -----------------------------------------
step "memory" "${LIMITS[3]}" sh -c "$PYTHON benchmarks/memory.py --device $DEVICE --images ${MEMORY_IMAGES[*]} \
    > '$OUT/memory.md'"

say "done: $FAILED step(s) failed"
exit "$FAILED"
