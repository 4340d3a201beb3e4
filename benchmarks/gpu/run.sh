#!/usr/bin/env bash
# The GPU benchmarks of aptune in one command, for a lent GPU machine (one H200 or H100), in at most 9 minutes.
#
#   benchmarks/gpu/run.sh OUTDIR             # on the GPU machine, from the repository root, with .gpu/ carried
#   benchmarks/gpu/run.sh OUTDIR --steps 7   # the SmolLM2 step alone, with .gpu-lm/ carried (see step 7)
#   benchmarks/gpu/run.sh OUTDIR --dry-run   # here, on the CPU: the same steps on a tiny random BERT
#   benchmarks/gpu/run.sh OUTDIR --steps 2,3 # only some of the steps below (each is independent but 3, which
#                                            # reads step 2's APT structure)
#
# Needs .gpu/ for steps 1-6 and .gpu-lm/ for step 7 (python benchmarks/gpu/prepare.py writes both: MiniLM in fp16
# and rt-polarity; SmolLM2's config and tokenizer and Brown; each with the wheels of the packages the GPU machine
# lacks, installed under /tmp/site); the GPU machine has no package registry, and aptune runs from src/
# (PYTHONPATH). Steps, each writing under OUTDIR as it finishes (so a run cut short still leaves what it did):
#   0. env.txt: GPU, driver, versions;
#   1. benchmarks/inference_speed.py on a random BERT-base: uniform aligned shapes at densities 0.3-0.9;
#      interleaved with the dense model, bf16, 512 x 128;
#   2. aptune bench --preset gpu on MiniLM + rt-polarity: full, lora, lora-prune, apt-distill, apt-nodistill
#      (TTA, CUDA max-allocated training memory, bf16 inference at 512 x 128 against the dense model);
#   3. the per-layer shape APT chose for MiniLM in step 2, scaled to BERT-base, timed as in step 1;
#   4. benchmarks/step_time.py: APT's dense-phase step against PEFT LoRA's on q, v, up (MiniLM at 32 x 64, and a
#      random BERT-base at 32 x 128; fp32);
#   5. design decisions (issue 11): APT at density 0.4 for 3 epochs, 2 seeds, without the kurtosis term, with
#      it, and with self-distillation; six runs at once on the one GPU (accuracy only: their times mean little);
#   6. benchmarks/lm_loss_chunks.py: the causal-LM loss without logits (issue 12) against the whole logits, on a
#      Llama-3-8B head (4096 x 128,256) at 16,384 tokens in bf16, chunk sizes 512-4096 (time and peak memory;
#      checks the 512 MiB chunk budget aptune uses on GPUs). Run alone with --steps 6 (about a minute).
#   7. aptune bench --preset gpu-lm: SmolLM2-135M, APT pruned once to density 0.7 (uniform shape) against dense
#      LoRA, batch 8 x 512, bf16 (CUDA max-allocated memory of the training steps, training tokens/s, held-out
#      perplexity, prefill and decode against dense). Its weights do not fit one call beside the rest: with
#      .gpu-w1/ carried by one call and .gpu-w2/ by the next (prepare.py --lm-weights), the real ones; else random
#      weights of SmolLM2's shape (memory and tokens/s hold; the shape APT keeps comes from random salience).
set -uo pipefail
OUTDIR=${1:?usage: benchmarks/gpu/run.sh OUTDIR [--dry-run] [--steps 1,2,3,4,5,6,7]}
shift
DRY=0
STEPS=1,2,3,4,5,6
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1;;
    --steps) STEPS=${2:?--steps needs a list such as 1,2}; shift;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
  shift
done
want() { case ",$STEPS," in *",$1,"*) return 0;; *) return 1;; esac; }
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
SEED=0
started=$(date +%s)
log() { echo "[$(($(date +%s) - started)) s] $*"; }

if [ $DRY = 1 ]; then
  ASSETS="$OUTDIR/.assets"
  $PY benchmarks/gpu/prepare.py --tiny --out "$ASSETS" || exit 1
  MODEL="$ASSETS/minilm"; DATA="$ASSETS/data/rt-polarity"
  BENCH_FLAGS=(--cpu --inference-device cpu --inference-dtype float32 --inference-batch-size 4
               --inference-length 16 --inference-runs 3 --epochs 2 --batch-size 16)
  SPEED_DENSE=(--dense-config "$ASSETS/tiny-bert-config.json")
  SPEED_FLAGS=(--batch-sizes 4 --lengths 16 --dtypes float32 --device cpu --runs 3)
  STEP_FLAGS=(--device cpu --steps 4 --warmup 1 --batch-size 4 --length 16); STEP_LONG=16
  DECISION_EPOCHS=2; DECISION_FLAGS=(--cpu --batch-size 16)
  LOSS_FLAGS=(--device cpu --tokens 256 --rounds 1 --shapes tiny:64:4096 --rows 64 128)
  LM_SOURCE="$ASSETS/smollm2"; LM_DATA="$ASSETS/data/brown"
  LM_FLAGS=(--cpu --max-steps 16 --batch-size 2 --max-length 64 --eval-stride 32)
else
  if want 2 || want 3 || want 4 || want 5; then
    [ -d .gpu/minilm ] || { echo "no .gpu/minilm: run python benchmarks/gpu/prepare.py here first and carry .gpu" >&2; exit 2; }
  fi
  if want 7; then
    [ -d .gpu-lm/smollm2 ] || { echo "no .gpu-lm/smollm2: run python benchmarks/gpu/prepare.py here first and carry .gpu-lm" >&2; exit 2; }
  fi
  # the packages the GPU machine lacks (datasets and two of its needs), from the carried wheels
  WHEELS=$(ls .gpu/wheels/*.whl .gpu-lm/wheels/*.whl .gpu-w2/wheels/*.whl 2>/dev/null | awk -F/ '!seen[$NF]++')
  if [ -n "$WHEELS" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $WHEELS \
      || { echo "installing the carried wheels failed" >&2; exit 2; }
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  $PY -c "import datasets" || { echo "no datasets package: carry .gpu/wheels (prepare.py writes them)" >&2; exit 2; }
  MODEL=.gpu/minilm; DATA=.gpu/data/rt-polarity
  LM_SOURCE=.gpu-lm/smollm2; LM_DATA=.gpu-lm/data/brown; LM_FLAGS=()
  BENCH_FLAGS=()
  SPEED_DENSE=(--dense-config bert-base)
  SPEED_FLAGS=(--batch-sizes 512 --lengths 128 --dtypes bfloat16 --device cuda --runs 20)
  STEP_FLAGS=(--device cuda --steps 60 --warmup 10 --batch-size 32 --length 64); STEP_LONG=128
  DECISION_EPOCHS=3; DECISION_FLAGS=()
  LOSS_FLAGS=(--device cuda --dtype bfloat16 --tokens 16384 --rounds 5 --shapes llama3-8b:4096:128256
              --rows 512 1024 2048 4096)
fi

{
  date -u; uname -a; nvidia-smi 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__); print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
  $PY -c "import peft; print('peft', peft.__version__)" 2>&1
  git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
} > "$OUTDIR/env.txt" 2>&1

if want 1; then
log "1. inference speed, uniform aligned shapes, densities 0.3-0.9"
$PY benchmarks/inference_speed.py "${SPEED_DENSE[@]}" --uniform-density 0.3 0.4 0.5 0.6 0.7 0.8 0.9 \
    "${SPEED_FLAGS[@]}" --seed $SEED --out "$OUTDIR/inference-bert-base-uniform.json" 2>&1 | tee "$OUTDIR/speed.log"
fi

if want 2; then
log "2. bench (full lora lora-prune apt-distill apt-nodistill)"
$PY -m aptune.cli bench --preset gpu --model "$MODEL" --data "$DATA" --seed $SEED \
    --methods full lora lora-prune apt-distill apt-nodistill --output "$OUTDIR/bench" --resume --no-progress \
    "${BENCH_FLAGS[@]}" 2>&1 | tee "$OUTDIR/bench.log"
log "bench exit ${PIPESTATUS[0]}"
fi

if want 3; then
STRUCT="$OUTDIR/bench/apt-nodistill/model/aptune_structure.json"
if [ -f "$STRUCT" ]; then
  log "3. inference speed, APT's MiniLM shape scaled to the dense model"
  $PY benchmarks/inference_speed.py "${SPEED_DENSE[@]}" --structure "$STRUCT" --scale-to-dense \
      "${SPEED_FLAGS[@]}" --seed $SEED --out "$OUTDIR/inference-bert-base-apt-shape.json" 2>&1 | tee -a "$OUTDIR/speed.log"
else
  log "3 skipped: no APT structure from step 2"
fi
fi

if want 4; then
log "4. dense-phase step time, APT against PEFT LoRA on q, v, up"
$PY benchmarks/step_time.py --model "$MODEL" "${STEP_FLAGS[@]}" --out "$OUTDIR/step-time.json" 2>&1 | tee "$OUTDIR/step-time.log"
$PY benchmarks/step_time.py "${SPEED_DENSE[@]}" "${STEP_FLAGS[@]}" --length "$STEP_LONG" \
    --out "$OUTDIR/step-time-bert-base.json" 2>&1 | tee -a "$OUTDIR/step-time.log"
fi

if want 5; then
log "5. design decisions: 3 variants x 2 seeds, concurrently"
mkdir -p "$OUTDIR/decisions"
for seed in 0 1; do
  for variant in nokurt kurt distill; do
    case $variant in
      nokurt) flags=(--no-distill --no-use-kurtosis);;
      kurt) flags=(--no-distill --use-kurtosis);;
      distill) flags=(--distill);;
    esac
    OMP_NUM_THREADS=2 $PY -m aptune.cli train --model "$MODEL" --data "$DATA" --method apt --density 0.4 \
        --epochs "$DECISION_EPOCHS" --seed $seed --output "$OUTDIR/decisions/$variant-s$seed" --no-measure-speed \
        --no-progress "${DECISION_FLAGS[@]}" "${flags[@]}" > "$OUTDIR/decisions/$variant-s$seed.log" 2>&1 &
  done
done
wait
$PY benchmarks/summarize_runs.py "$OUTDIR/decisions" --json "$OUTDIR/decisions.json" | tee "$OUTDIR/decisions.md"
fi

if want 6; then
log "6. the causal-LM loss without logits against the whole logits"
$PY benchmarks/lm_loss_chunks.py "${LOSS_FLAGS[@]}" --out "$OUTDIR/lm-loss-chunks.json" 2>&1 | tee "$OUTDIR/lm-loss.log"
fi
if want 7; then
log "7. SmolLM2-135M: APT pruned once to 0.7 (uniform) against dense LoRA, 8 x 512, bf16"
LM_MODEL=/tmp/aptune-smollm2
PARTS=()
if [ -f .gpu-w1/smollm2.gguf.part1 ] && [ -f .gpu-w2/smollm2.gguf.part2 ]; then
  PARTS=(--gguf-parts .gpu-w1/smollm2.gguf.part1 .gpu-w2/smollm2.gguf.part2)
fi
$PY benchmarks/gpu/lm_weights.py "$LM_SOURCE" "$LM_MODEL" "${PARTS[@]}" 2>&1 | tee "$OUTDIR/lm-weights.log"
cp "$LM_MODEL/aptune_weights.txt" "$OUTDIR/lm-weights.txt" 2>/dev/null
$PY -m aptune.cli bench --preset gpu-lm --model "$LM_MODEL" --data "$LM_DATA" --seed $SEED \
    --output "$OUTDIR/bench-lm" --resume --no-progress "${LM_FLAGS[@]}" 2>&1 | tee "$OUTDIR/bench-lm.log"
log "bench-lm exit ${PIPESTATUS[0]}"
fi
log "done"
