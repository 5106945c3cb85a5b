#!/usr/bin/env bash
# One device call for the training-step numbers in bench/RESULTS.md; JSON and logs go to $OUT.
#   bash bench/gpu_train_session.sh single    # 1 GPU (~7 min): build, GPU tests (TESTS=0 skips), train step 256 px (COMPILE,
#                                             #   default "on"), CUDA graphs at 256/512/1024 px (CG=0 skips)
#   bash bench/gpu_train_session.sh profile   # 1 GPU (~4 min): build, kernel/host profile of the compiled 256 px step
#   bash bench/gpu_train_session.sh e2e       # 2 GPUs (~4 min): the real entry point (python -m trainer.train) on tiny latent
#                                             #   shards, bf16, ddp/fsdp compiled and zero2/zero3, each run to 128 images and resumed to
#                                             #   192 (fsdp and zero3 resumed on 1 GPU); STRATS picks strategies
#   bash bench/gpu_train_session.sh fsdp      # 2 GPUs (~7 min): two-GPU tests, FSDP2 1 vs 2 GPUs, blocks_per_unit $BPUS (default 4),
#                                             #   reshard after forward $RESHARD (default off), 2-rank profile if PROFILE=1
# Each benchmark row compiles afresh (torch._dynamo.reset), so a row costs its compile time in warm-up.
# On the lent GPU machine start with `source .whl/prelude.sh` (hydra etc. travel as wheels).
set -o pipefail
what=${1:-single}
OUT=${OUT:-/tmp/train_session_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} FLOWDCN_EXT_DIR=${FLOWDCN_EXT_DIR:-/tmp/flowdcn_ext}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
t0=$(date +%s)
python3 -c "from cuda_ext.msdcn import build; build.load()" 2>&1 | tail -n 3 || { echo "BUILD FAILED"; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
TS="python3 bench/train_step.py --steps 10 --warmup 3"
if [ "$what" = single ]; then
  [ "${TESTS:-1}" = 1 ] && timeout 120 python3 -m pytest -q -m cuda -p no:cacheprovider tests/cuda_ext tests/trainer/test_compile_modes_gpu.py 2>&1 | tail -n 2
  timeout 150 $TS --res 256 --compile "${COMPILE:-on}" --out "$OUT/ts256.json" 2>&1 | grep -v -i warn | tail -n 7
  [ "${CG:-1}" = 1 ] && timeout 270 $TS --res 256 512 1024 --compile on --compile-mode reduce-overhead --out "$OUT/ts_cg.json" 2>&1 | grep -v -i warn | tail -n 10
fi
if [ "$what" = profile ]; then
  timeout 200 python3 bench/profile_step.py --compile on --python --out "$OUT/profile.json" 2>&1 | grep -v -i warn | grep -B2 -A9 "^== " | head -n 40
fi
if [ "$what" = e2e ]; then
  rm -rf /tmp/e2e /tmp/stages /tmp/evalout   # a warm machine keeps /tmp: never resume an earlier call's runs
  python3 -m data_pipeline.tiny --out /tmp/tl 2>&1 | tail -n 1
  E2E="-m trainer.train experiment=tiny_latents data.latents.manifest=/tmp/tl/latents/manifest.json train.precision=bf16
       train.deterministic=false logging.progress=false"
  for s in ${STRATS:-ddp fsdp zero2 zero3}; do
    c=false; case $s in ddp|fsdp) c=true;; esac
    d=/tmp/e2e/$s; n2=2; case $s in fsdp|zero3) n2=1;; esac   # resume on one GPU: DCP resharding / universal format
    for leg in "2 128" "$n2 192"; do
      set -- $leg
      timeout 240 torchrun --standalone --nproc_per_node "$1" $E2E strategy=$s train.compile=$c run_dir=$d train.total_nimg=$2 \
        > "$OUT/e2e_${s}_$2.log" 2>&1; rc=$?
      echo "e2e $s nproc=$1 total=$2 rc=$rc: $(grep -E '^nimg=' "$OUT/e2e_${s}_$2.log" | tail -n 1 | cut -c1-120)"
      [ $rc = 0 ] || grep -v -i warn "$OUT/e2e_${s}_$2.log" | tail -n 15
    done
    grep -h -o '"nimg": [0-9]*' $d/DONE.json; grep -c resum "$OUT/e2e_${s}_192.log"
  done
  if [ "${EVAL:-1}" = 1 ]; then
    # offline evaluation of the fsdp run's newest checkpoint on 2 GPUs (tiny extractor, random reference), 2 resolutions
    python3 -c "import numpy as np; np.savez('/tmp/ref.npz', arr_0=np.random.default_rng(0).integers(0, 256, (32, 64, 64, 3)).astype(np.uint8))"
    timeout 200 torchrun --standalone --nproc_per_node 2 -m evaluation.run model.ckpt=/tmp/e2e/fsdp vae=/tmp/tl/vae \
      'resolutions=[[64,64],[64,96]]' sampling=euler50 sampling.steps=5 sampling.num_samples=24 sampling.chunk_size=6 \
      metrics.extractor=tiny metrics.is_splits=2 reference.npz=/tmp/ref.npz out_dir=/tmp/evalout run_name=r > "$OUT/e2e_eval.log" 2>&1
    echo "e2e eval rc=$?"; grep -E "^\[eval\]" "$OUT/e2e_eval.log" || tail -n 20 "$OUT/e2e_eval.log"
    # the 3-stage tiny pipeline (256 → 512 → multiscale presets, shrunk) chained in one 2-GPU launch
    timeout 240 torchrun --standalone --nproc_per_node 2 -m trainer.stages run experiment=tiny root=/tmp/stages > "$OUT/e2e_stages.log" 2>&1
    echo "e2e stages rc=$?"; python3 -m trainer.stages status experiment=tiny root=/tmp/stages 2>&1 | tail -n 5
  fi
fi
if [ "$what" = fsdp ]; then
  # two-GPU tests first: FSDP worker on nccl (local-shard AdamW vs torch's DTensor step, grad norm, resharding)
  timeout 150 python3 -m pytest -q -m cuda -p no:cacheprovider tests/trainer/test_fsdp_runs.py ${FSDP_TESTS_EXTRA-tests/cuda_ext} 2>&1 | tail -n 2
  [ "${BENCH:-1}" = 1 ] || { echo "session wall $(( $(date +%s) - t0 )) s"; exit 0; }
  bpus=${BPUS:-4}
  for bpu in $bpus; do
    for n in 1 2; do
      timeout 150 torchrun --standalone --nproc_per_node "$n" bench/train_step.py --strategy fsdp --blocks-per-unit "$bpu" \
        --reshard "${RESHARD:-off}" --res 256 --compile on --steps 20 --warmup 3 --out "$OUT/fsdp${n}_bpu${bpu}.json" 2>&1 \
        | grep -E "^(FlowDCN|SiT)-XL"
    done
  done
  # where a 2-rank FSDP step spends its time (host gaps, NCCL kernels), each rank's view (rank 1: profile_fsdp2.rank1.json)
  [ "${PROFILE:-0}" = 1 ] && timeout 150 torchrun --standalone --nproc_per_node 2 bench/profile_step.py --strategy fsdp \
    --blocks-per-unit "${bpus%% *}" --reshard "${RESHARD:-off}" --models FlowDCN-XL/2 --compile on --python \
    --out "$OUT/profile_fsdp2.json" 2>&1 | grep -v -i warn | grep -A9 "^== " | head -n 24
fi
echo "session wall $(( $(date +%s) - t0 )) s"
