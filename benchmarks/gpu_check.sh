#!/usr/bin/env bash
# The GPU check of zoo's training loop, in one run of at most ~8 minutes on one CUDA GPU:
#
#   1. the environment (torch, the GPU, onnxruntime's providers);
#   2. a generated class-per-folder image tree (1,000 JPEG files at 256 px), used as folder:PATH;
#   3. slim_resnet50 at 224 px, bf16, channels-last: a hand-written timm-style loop, `zoo train`'s
#      loop eager, and compiled (images/s, peak memory, MFU, compile time: bench_loop.py);
#   4. slim_gpt_small on a generated 8 MB byte corpus, the same three loops (tokens/s, MFU);
#   5. the real command: `zoo train slim_resnet50 --device cuda --amp bf16 --channels-last`;
#   6. `zoo export --device cuda` of its width-0.5 member (verified on the CUDA provider);
#   7. Predictor(device="cuda") on that file: providers, agreement with the CPU, latency.
#
# Results go to benchmarks/results/gpu_check/ (or --out-dir), with summary.md listing each
# step, its status and its seconds; the exit code is 1 if any step failed.
#
#   benchmarks/gpu_check.sh                  # on a CUDA machine
#   benchmarks/gpu_check.sh --cpu-dry-run    # every step on the CPU, tiny sizes (a few minutes)
#
# The dry run uses the CPU, 16 images at 40 px, a few steps, torch.compile's aot_eager backend
# (inductor's C++ compilation of ResNet-50 takes many minutes on a CPU) and --device cpu for
# the export and the Predictor; it checks that the script runs, not what the GPU measures.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

mode=gpu
out=benchmarks/results/gpu_check
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) mode=cpu; shift ;;
    --out-dir) out="$2"; shift 2 ;;
    *) echo "error: unknown argument $1 (use --cpu-dry-run, --out-dir DIR)" >&2; exit 2 ;;
  esac
done

if [ "$mode" = gpu ]; then
  device=cuda; classes=10; per_class=100; size=256; img=224; batch=128; steps=50; skip=15; workers=8
  gpt_seq=256; gpt_batch=64; megabytes=8; backend=inductor; train_steps=20; train_batch=64; require=--require-cuda
else
  device=cpu; classes=2; per_class=8; size=40; img=32; batch=8; steps=4; skip=1; workers=0
  gpt_seq=32; gpt_batch=4; megabytes=0.25; backend=aot_eager; train_steps=2; train_batch=8; require=
fi

mkdir -p "$out"
work=$(mktemp -d -t zoo-gpu-check-XXXXXX)
trap 'rm -rf "$work"' EXIT
summary="$out/summary.md"
printf '# GPU check (%s mode, %s)\n\n| step | status | seconds |\n|---|---|---:|\n' "$mode" "$(date -u +%Y-%m-%dT%H:%MZ)" > "$summary"
failed=0

step() {  # step NAME COMMAND...: run it, log its output, record status and time
  local name="$1"; shift
  local start=$SECONDS
  echo "=== $name" >&2
  if "$@" > >(tee "$out/$name.log") 2>&1; then status=ok; else status="FAILED (exit $?)"; failed=1; fi
  printf '| %s | %s | %d |\n' "$name" "$status" "$((SECONDS - start))" >> "$summary"
}

step environment python benchmarks/gpu_check.py environment $require
[ "$mode" = gpu ] && [ "$failed" = 1 ] && { cat "$summary"; exit 1; }
peak=$(python benchmarks/gpu_check.py peak-tflops)
peak_args=()
[ -n "$peak" ] && peak_args=(--peak-tflops "$peak")

step images python benchmarks/gpu_check.py images "$work/images" --classes $classes --per-class $per_class --size $size
step resnet50_loops python benchmarks/bench_loop.py --model slim_resnet50 --data "folder:$work/images" --img-size $img \
  --batch-size $batch --amp bf16 --channels-last --device $device --workers $workers --loops timm,zoo,zoo-compiled \
  --compile-backend $backend --steps $steps --skip $skip --repeats 1 "${peak_args[@]}" --out "$out/resnet50.md"
step text python benchmarks/gpu_check.py text "$work/corpus.txt" --megabytes $megabytes
step gpt_small_loops python benchmarks/bench_loop.py --model slim_gpt_small --data "text:$work/corpus.txt" --seq-len $gpt_seq \
  --batch-size $gpt_batch --lr 0.001 --amp bf16 --device $device --loops timm,zoo,zoo-compiled --compile-backend $backend \
  --steps $steps --skip $skip --repeats 1 "${peak_args[@]}" --out "$out/gpt_small.md"
step zoo_train python -m cli train slim_resnet50 --data "folder:$work/images" --img-size $img --width 0.5 \
  --steps $train_steps --batch-size $train_batch --amp bf16 --channels-last --device $device --workers $workers --out "$work/run"
step zoo_export python -m cli export "$work/run/model.safetensors" --width 0.5 --device $device --out "$work/member.onnx"
step predictor python benchmarks/gpu_check.py predictor "$work/member.onnx" "$work/images" --device $device --out "$out/predictor.json"

cat "$summary"
exit $failed
