#!/usr/bin/env bash
# One GPU session for the MSDCN kernels: build, CUDA tests, op benchmark. Logs and JSON go to $OUT.
#   bash bench/gpu_msdcn_session.sh [tests|bench|ncu|tiled|all]   (default all)
# tiled: CUDA tests with the tiled backward off and on, then tiled vs untiled timings and a tile sweep.
# gather: CUDA tests (gather backward, the default) and the scatter backward's kernel tests, gather vs scatter
#   timings and pull widths (PULL_VECS, default 1,2,3,4), pull variants at XL (VARIANTS: env assignments), ncu of
#   the gather kernels, then the op table
#   (OPTABLE=0 skips it).
set -o pipefail
what=${1:-all}
OUT=${OUT:-/tmp/msdcn_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD FLOWDCN_EXT_DIR=${FLOWDCN_EXT_DIR:-/tmp/flowdcn_ext}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
# Writes /tmp/ncu_drive.py (three fused XL 32² fwd+bwd calls) and sets NCU to the Nsight Compute binary.
ncu_driver() {
  cat > /tmp/ncu_drive.py <<'PY'
import sys, torch
sys.path.insert(0, "bench")
from msdcn_op import make_inputs, with_grad, ours_fwdbwd
a = with_grad(make_inputs(32, 32, 32, 16, 72, 9, 0))
for _ in range(3):
    ours_fwdbwd(*a)
torch.cuda.synchronize()
PY
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
}
t0=$(date +%s)
python3 - <<'PY' 2>&1 | tee "$OUT/build.log" | tail -n 25
import time
from cuda_ext.msdcn import build
t = time.time()
build.load(verbose=False)
print(f"build+load {time.time() - t:.1f} s", build.module_name(build.arch_of()))
PY
[ $? -eq 0 ] || { echo "BUILD FAILED"; cat "$FLOWDCN_EXT_DIR"/*/build.log 2>/dev/null | tail -n 60; exit 1; }
if [ "$what" = all ] || [ "$what" = tests ]; then
  timeout 420 python3 -m pytest -q -m cuda -p no:cacheprovider tests/cuda_ext --durations=8 -rs 2>&1 | tee "$OUT/tests.log" | tail -n 45
fi
if [ "$what" = tiled ]; then
  for flag in 0 1; do
    echo "== pytest -m cuda, FLOWDCN_MSDCN_TILED_BWD=$flag"
    FLOWDCN_MSDCN_TILED_BWD=$flag timeout 180 python3 -m pytest -q -m cuda -p no:cacheprovider tests/cuda_ext -rs 2>&1 | tee "$OUT/tests_tiled$flag.log" | tail -n 25
  done
  timeout 200 python3 bench/msdcn_op.py --json "$OUT/bench_tiled.json" --no-op --no-ref --tile-sweep --tiled 2>&1 | tee "$OUT/bench_tiled.log" | tail -n 30
fi
if [ "$what" = gather ]; then
  echo "== pytest -m cuda (gather backward)"
  timeout 300 python3 -m pytest -q -m cuda -p no:cacheprovider tests/cuda_ext -rs 2>&1 | tee "$OUT/tests_gather.log" | tail -n 30
  echo "== pytest -m cuda test_msdcn_cuda.py, FLOWDCN_MSDCN_BWD=scatter"
  FLOWDCN_MSDCN_BWD=scatter timeout 200 python3 -m pytest -q -m cuda -p no:cacheprovider tests/cuda_ext/test_msdcn_cuda.py 2>&1 | tee "$OUT/tests_scatter.log" | tail -n 8
  timeout 300 python3 bench/msdcn_op.py --json "$OUT/bench_backwards.json" --no-op --no-ref --backwards --pull-vecs "${PULL_VECS:-1,2,3,4}" 2>&1 | tee "$OUT/bench_backwards.log" | tail -n 22 | cut -c1-250
  for v in ${VARIANTS:-FLOWDCN_MSDCN_PULL_ORDER=pixel}; do
    env $v timeout 120 python3 bench/msdcn_op.py --json "$OUT/bench_${v#FLOWDCN_MSDCN_}.json" --no-op --no-ref --backwards --shapes XL --grids 32,64 2>&1 | tail -n 2 | cut -c1-60 | sed "s/^/$v: /"
  done
  ncu_driver
  timeout 200 $NCU -k regex:msdcn_gather --launch-skip 8 --launch-count 4 --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis --section LaunchStats python3 /tmp/ncu_drive.py > "$OUT/ncu_gather.txt" 2>&1
  grep -E "msdcn_|Duration|Registers Per|Achieved Occupancy|Memory Throughput|L1/TEX Hit|L2 Hit|DRAM Throughput|Compute \(SM\)|Warp Cycles Per Issued" "$OUT/ncu_gather.txt" | cut -c1-140 | head -n 48
  [ "${OPTABLE:-1}" = 1 ] && timeout 300 python3 bench/msdcn_op.py --json "$OUT/bench_msdcn_op.json" --no-ref 2>&1 | tee "$OUT/bench.log" | tail -n 9
  echo "== tests"; tail -n 3 "$OUT/tests_gather.log"; tail -n 2 "$OUT/tests_scatter.log"
  grep -E "^(FAILED|ERROR)" "$OUT/tests_gather.log" "$OUT/tests_scatter.log" | head -n 20
fi
if [ "$what" = all ] || [ "$what" = ncu ]; then
  ncu_driver
  timeout 240 $NCU -k regex:msdcn --launch-skip 2 --launch-count 2 --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis --section LaunchStats python3 /tmp/ncu_drive.py > "$OUT/ncu.txt" 2>&1
  grep -E "msdcn_|Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Memory Throughput|L1/TEX Hit|L2 Hit|DRAM Throughput|Compute \(SM\)|Warp Cycles Per Issued|Block Limit|Stall|One or More" "$OUT/ncu.txt" | cut -c1-150 | head -n 60
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  timeout 400 python3 bench/msdcn_op.py --json "$OUT/bench_msdcn_op.json" --sweep --diagnose --block 2>&1 | tee "$OUT/bench.log" | tail -n 40
fi
echo "session wall $(( $(date +%s) - t0 )) s"
