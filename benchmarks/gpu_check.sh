#!/usr/bin/env bash
# The GPU check of zoo's training loop, in one run of at most 6 minutes on one CUDA GPU:
#
#   1. the environment (torch, the GPU, onnxruntime's providers, the CPU): environment.json;
#   2. a generated class-per-folder image tree (1,000 JPEG files at 256 px), used as folder:PATH;
#   3. slim_resnet50 at 224 px, bf16, channels-last: a hand-written timm-style loop, `zoo train`'s
#      loop eager, and compiled (images/s, peak memory, MFU, compile time: bench_loop.py);
#   4. slim_gpt_small on a generated 8 MB byte corpus, the same three loops (tokens/s, MFU);
#   5. the exactness tests (masked steps, update rules, resume) on the device (ZOO_TEST_DEVICE);
#   6. the real command: `zoo train slim_resnet50 --device cuda --amp bf16 --channels-last`;
#   7. `zoo export --device cuda` of its width-0.5 member (verified on the CUDA provider);
#   8. Predictor(device="cuda") on that file: providers, agreement with the CPU, latency.
#
# Steps 7 and 8 need onnxruntime's CUDA provider (the onnxruntime-gpu package): without it they
# are recorded "skipped: CUDA provider not installed" and the check goes on.
#
# By design the check stays within its time budget (--time-budget, default 330 s: every step
# runs under `timeout` with what is left, and a step with nothing left is recorded "skipped: out
# of time") and leaves at most 8 result files in --out-dir (default benchmarks/results/gpu_check/):
# the fixed list RESULT_FILES below; every step's output goes to steps.log, and summary.md lists
# each step, its status and its seconds. The exit code is 1 if any step failed.
#
#   benchmarks/gpu_check.sh                        # on a CUDA machine
#   benchmarks/gpu_check.sh --cpu-dry-run          # every step on the CPU, small sizes (~5 minutes)
#   benchmarks/gpu_check.sh --cpu-dry-run --tiny   # ResNet-20, GPT-nano, eager loops, no exactness step (CI)
#   PYTHON=/path/to/python benchmarks/gpu_check.sh # the interpreter (default: python3)
#
# The dry run uses the CPU, 16 images at 40 px, a few steps, torch.compile's aot_eager backend
# (inductor's C++ compilation of ResNet-50 takes many minutes on a CPU) and --device cpu for
# the export and the Predictor; it checks that the script runs, not what the GPU measures.
# --export-device cuda on a machine without the CUDA provider takes the skipping path.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python="${PYTHON:-python3}"

RESULT_FILES=(summary.md steps.log environment.json image_loops.md image_loops.json text_loops.md text_loops.json
  predictor.json)

mode=gpu
tiny=0
out=benchmarks/results/gpu_check
export_device=
budget=
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) mode=cpu; shift ;;
    --tiny) tiny=1; shift ;;
    --out-dir) out="$2"; shift 2 ;;
    --export-device) export_device="$2"; shift 2 ;;
    --time-budget) budget="$2"; shift 2 ;;
    *) echo "error: unknown argument $1 (use --cpu-dry-run, --tiny, --out-dir DIR, --export-device cpu|cuda," \
      "--time-budget SECONDS)" >&2; exit 2 ;;
  esac
done

if [ "$mode" = gpu ]; then
  device=cuda; classes=10; per_class=100; size=256; img=224; batch=128; steps=50; skip=15; workers=8
  gpt_seq=256; gpt_batch=64; megabytes=8; backend=inductor; train_steps=20; train_batch=64; require=--require-cuda
  exactness=(tests/test_masking.py tests/test_updates.py
    tests/test_train.py::test_resume_is_bit_identical_to_an_uninterrupted_run)
  default_budget=330
else
  device=cpu; classes=2; per_class=8; size=40; img=32; batch=8; steps=4; skip=1; workers=0
  gpt_seq=32; gpt_batch=4; megabytes=0.25; backend=aot_eager; train_steps=2; train_batch=8; require=
  exactness=(tests/test_masking.py)
  default_budget=1800
fi
image_model=slim_resnet50; text_model=slim_gpt_small; loops=timm,zoo,zoo-compiled
if [ "$tiny" = 1 ]; then
  [ "$mode" = cpu ] || { echo "error: --tiny is for --cpu-dry-run" >&2; exit 2; }
  image_model=slim_resnet20; text_model=slim_gpt_nano; loops=timm,zoo; steps=2; skip=0; default_budget=600
  exactness=()  # the test suite that runs --tiny runs these tests itself
fi
export_device="${export_device:-$device}"
budget="${budget:-$default_budget}"

mkdir -p "$out"
for file in "$out"/* "$out"/.[!.]*; do  # only the check's own files: a folder of other things is not its to fill
  [ -e "$file" ] || continue
  name=$(basename "$file")
  if [[ ! " ${RESULT_FILES[*]} " == *" $name "* ]]; then
    echo "error: $out holds $name, which is not a result of this check; give an empty folder with --out-dir" >&2
    exit 2
  fi
done
for name in "${RESULT_FILES[@]}"; do rm -f "$out/$name"; done  # no result of an earlier run survives a skipped step

work=$(mktemp -d -t zoo-gpu-check-XXXXXX)
trap 'rm -rf "$work"' EXIT
summary="$out/summary.md"
log="$out/steps.log"
printf '# GPU check (%s mode%s, %s)\n\n| step | status | seconds |\n|---|---|---:|\n' \
  "$mode" "$([ "$tiny" = 1 ] && echo ", tiny")" "$(date -u +%Y-%m-%dT%H:%MZ)" > "$summary"
deadline=$((SECONDS + budget))
failed=0

record() {  # record NAME STATUS SECONDS
  printf '| %s | %s | %d |\n' "$1" "$2" "$3" >> "$summary"
}

skip() {  # skip NAME REASON
  echo "=== $1: skipped: $2" | tee -a "$log" >&2
  record "$1" "skipped: $2" 0
}

step() {  # step NAME COMMAND...: run it within the time left, log its output, record status and time
  local name="$1"; shift
  local start=$SECONDS left=$((deadline - SECONDS)) code
  if [ "$left" -le 0 ]; then skip "$name" "out of time"; return; fi
  echo "=== $name" | tee -a "$log" >&2
  timeout --kill-after=10 "$left" "$@" > >(tee -a "$log") 2>&1
  code=$?
  if [ "$code" = 0 ]; then status=ok
  elif [ "$code" = 124 ] || [ "$code" = 137 ]; then status="FAILED (out of time after $((SECONDS - start)) s)"; failed=1
  else status="FAILED (exit $code)"; failed=1; fi
  record "$name" "$status" "$((SECONDS - start))"
}


step environment "$python" benchmarks/gpu_check.py environment $require --out "$out/environment.json"
[ "$mode" = gpu ] && [ "$failed" = 1 ] && { cat "$summary"; exit 1; }
peak=$(sed -n 's/.*"peak_bf16_tflops": \([0-9.]*\).*/\1/p' "$out/environment.json" 2>/dev/null)
peak_args=()
[ -n "$peak" ] && peak_args=(--peak-tflops "$peak")

step images "$python" benchmarks/gpu_check.py images "$work/images" --classes $classes --per-class $per_class \
  --size $size
step image_loops "$python" benchmarks/bench_loop.py --model $image_model --data "folder:$work/images" \
  --img-size $img --batch-size $batch --amp bf16 --channels-last --device $device --workers $workers --loops $loops \
  --compile-backend $backend --steps $steps --skip $skip --repeats 1 "${peak_args[@]}" --out "$out/image_loops.md"
step text "$python" benchmarks/gpu_check.py text "$work/corpus.txt" --megabytes $megabytes
step text_loops "$python" benchmarks/bench_loop.py --model $text_model --data "text:$work/corpus.txt" \
  --seq-len $gpt_seq --batch-size $gpt_batch --lr 0.001 --amp bf16 --device $device --loops $loops \
  --compile-backend $backend --steps $steps --skip $skip --repeats 1 "${peak_args[@]}" --out "$out/text_loops.md"
if [ ${#exactness[@]} -gt 0 ]; then
  step exactness env ZOO_TEST_DEVICE=$device "$python" -m pytest -q -p no:cacheprovider "${exactness[@]}"
else
  skip exactness "--tiny (run by the test suite itself)"
fi
step zoo_train "$python" -m cli train $image_model --data "folder:$work/images" --img-size $img --width 0.5 \
  --steps $train_steps --batch-size $train_batch --amp bf16 --channels-last --device $device --workers $workers \
  --out "$work/run"
if [ "$export_device" = cuda ] && ! "$python" -c 'import onnxruntime as o, sys
sys.exit("CUDAExecutionProvider" not in o.get_available_providers())'; then
  skip zoo_export "CUDA provider not installed"
  skip predictor "CUDA provider not installed"
else
  step zoo_export "$python" -m cli export "$work/run/model.safetensors" --width 0.5 --device "$export_device" \
    --out "$work/member.onnx"
  if [ -f "$work/member.onnx" ] || [ "$SECONDS" -ge "$deadline" ]; then
    step predictor "$python" benchmarks/gpu_check.py predictor "$work/member.onnx" "$work/images" \
      --device "$export_device" --out "$out/predictor.json"
  else
    skip predictor "no exported member"
  fi
fi

cat "$summary"
exit $failed
