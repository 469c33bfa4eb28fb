#!/usr/bin/env bash
# GPU benchmarks in under 10 minutes on one H200: training-step overhead of each mode at realistic batch sizes
# (bench/overhead.py, ResNet-18 and the tiny ViT, batch 256 and 128) and the 3-bit cells of the quality grid on
# Fashion-MNIST (bench/quality.py, profile "gpu": 20k training images, 3 epochs, 5k test images), then the tables
# (bench/aggregate.py).
#
#   bench/gpu.sh --data_dir data/fashion-mnist        # on the GPU machine (no internet: carry the IDX files)
#   bench/gpu.sh --dry-run                            # CPU smoke run of the same path, seconds-sized, numbers void
#
# The GPU machine cannot download anything: copy the four Fashion-MNIST IDX .gz files into the repository tree
# (e.g. `mkdir -p data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz data/fashion-mnist/`) and pass
# --data_dir. Results go to bench/results/ (overhead_cuda.json, overhead_vit_cuda.json, quality_gpu/); when $OUT is
# set, they are copied there too.
#
#   bench/gpu.sh --lm                                 # only the language-model runs: training-step overhead
#                                                     # (bench/overhead.py --model lm) and quality (bench/lm_quality.py)
#
#   bench/gpu.sh --full --data_dir data/fashion-mnist # the full-data grid's missing cells (bench/quality.py --profile
#                                                     # full), the CIFAR-stem ResNet-18 first (3-12 hours a cell on
#                                                     # 2 CPU cores). Cells are kept one by one; committing them makes
#                                                     # the next call go on where this one stopped. Cells a CPU worker
#                                                     # is running meanwhile run here too: stop it or skip them.
#                                                     # Results: $OUT/results/quality_full/.
#
#   bench/gpu.sh --vllm                               # vLLM serving the LM recipe's compressed-tensors exports:
#                                                     # trains the recipe's tiny LM (the regularizer at 4 bits,
#                                                     # group-wise 32), exports fp, w4 and w8 with --export_format
#                                                     # compressed-tensors, then bench/serve_vllm.py: tokens/s of each
#                                                     # against the fp16 model and perplexity through vLLM against
#                                                     # hf_oscq's. vLLM is installed first where it is missing (pip,
#                                                     # or wheels carried in .whl/). Results:
#                                                     # bench/results/serve_vllm.json.
#   bench/gpu.sh --vllm --dry-run                     # CPU: the same path with transformers in vLLM's place
#   bench/gpu.sh --runtime                            # packed checkpoints at run time on the GPU
#                                                     # (bench/runtime_memory.py --device cuda: LM decode and
#                                                     # prefill, image forward passes, weight memory, against fp32,
#                                                     # bf16 and torchao int8; packed weights dequantize on CUDA).
#                                                     # Results: bench/results/runtime_memory_cuda.json.
#
# The LM runs read the King James Version from data/kjv.txt on a machine without Debian's bible-kjv: write it with
# `mkdir -p data && bible -f Gen1:1-Rev22:21 > data/kjv.txt` before carrying the tree. Results:
# bench/results/lm_quality_cuda.json.
set -euo pipefail
cd "$(dirname "$0")/.."

data_dir=/usr/share/datasets/fashion-mnist
device=cuda
dry_run=0
lm=0
vllm=0
full=0
runtime=0
runtime_seconds=540
full_seconds=540
lm_seconds=540
overhead_seconds=100
quality_seconds=390
while [[ $# -gt 0 ]]; do
  case "$1" in
    --data_dir) data_dir="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --dry-run) dry_run=1; device=cpu; shift ;;
    --lm) lm=1; shift ;;
    --vllm) vllm=1; shift ;;
    --full) full=1; shift ;;
    --runtime) runtime=1; shift ;;
    -h|--help) sed -n '2,43p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument $1 (use --data_dir DIR, --device cuda|cpu, --dry-run, --lm, --vllm, --full, --runtime)" >&2; exit 2 ;;
  esac
done
if [[ "$runtime" == 1 ]]; then
  # packed checkpoints at run time: every model at full size on the GPU; a dry run measures the LM recipe's model
  # on the CPU in seconds (numbers void)
  runtime_args=(--device "$device" --threads 1 --loads 0 --output "bench/results/runtime_memory_${device}.json")
  [[ "$dry_run" == 1 ]] && runtime_args=(--device cpu --threads 1 --loads 0 --models lm_recipe --repeats 1
    --new_tokens 2 --output "$(mktemp -d)/runtime_memory_smoke.json")
  timeout "$runtime_seconds" python bench/runtime_memory.py "${runtime_args[@]}" \
    || echo "gpu.sh: runtime bench stopped (exit $?)" >&2
  if [[ -n "${OUT:-}" && "$dry_run" == 0 ]]; then
    mkdir -p "$OUT/results"
    cp "bench/results/runtime_memory_${device}.json" "$OUT/results/" || true
  fi
  exit 0
fi
corpus=()
[[ -f data/kjv.txt ]] && corpus=(--corpus_file data/kjv.txt)
if [[ "$vllm" == 1 ]]; then
  start=$(date +%s)
  scratch=$(mktemp -d)
  sed '/^baselines:/d' recipes/configs/lm_kjv_scratch.yaml > "$scratch/lm.yaml"  # the regularizer's run alone
  run=outputs/lm_vllm
  train=(--lm_size tiny --max_steps 600 --use_cpu false)
  serve=(--engine vllm)
  if [[ "$dry_run" == 1 ]]; then
    run="$scratch/lm_vllm"
    train=(--lm_size micro --max_steps 2 --max_train_blocks 64 --max_eval_blocks 4 --use_cpu true)
    serve=(--engine transformers --device cpu --dry-run --output "$scratch/serve_vllm_dry_run.json")
  elif ! python -c "import vllm" 2>/dev/null; then
    if compgen -G ".whl/vllm-*.whl" >/dev/null; then
      python -m pip install -q --no-index --find-links .whl vllm || true
    else
      python -m pip install -q vllm || true
    fi
    python -c "import vllm" 2>/dev/null || {
      echo "gpu.sh: vLLM is not installed and could not be installed: pip needs PyPI, or its wheels in .whl/." >&2
      exit 2
    }
  fi
  timeout "$lm_seconds" python recipes/train_lm.py --config "$scratch/lm.yaml" --output_dir "$run" "${train[@]}" \
    --export_format compressed-tensors --export_bits 4 8 --report_to none "${corpus[@]}"
  status=0
  python bench/serve_vllm.py --export "$run/export" "${serve[@]}" "${corpus[@]}" || status=$?
  if [[ -n "${OUT:-}" && "$dry_run" == 0 ]]; then
    mkdir -p "$OUT/results"
    cp bench/results/serve_vllm.json "$OUT/results/" || true
  fi
  echo "gpu.sh: vLLM bench done in $(( $(date +%s) - start )) s (exit $status)"
  exit "$status"
fi
if [[ "$lm" == 1 ]]; then
  # training-step overhead of each mode on a tiny Llama with group-wise scales (random tokens, no data needed)
  lm_batches=(64 16)
  [[ "$dry_run" == 1 ]] && lm_batches=(2)
  timeout "$overhead_seconds" python bench/overhead.py --model lm --device "$device" --batch-sizes "${lm_batches[@]}" \
    --output "bench/results/overhead_lm_${device}.json" || echo "gpu.sh: LM overhead run stopped (exit $?)" >&2
  timeout "$lm_seconds" python bench/lm_quality.py --device "$device" --lm_size tiny --block_size 256 \
    --batch_size 64 --max_steps 1500 --learning_rate 0.002 --threads 8 "${corpus[@]}" \
    --output bench/results/lm_quality_cuda.json || echo "gpu.sh: LM quality run stopped (exit $?)" >&2
  if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT/results"
    cp bench/results/lm_quality_cuda.json "bench/results/overhead_lm_${device}.json" "$OUT/results/" || true
  fi
  exit 0
fi
for stem in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  if [[ ! -f "$data_dir/$stem.gz" && ! -f "$data_dir/$stem" ]]; then
    echo "gpu.sh: $data_dir lacks $stem(.gz): pass --data_dir with the Fashion-MNIST IDX files." >&2
    exit 2
  fi
done
if [[ "$device" == cuda ]] && ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu.sh: no CUDA device visible; use --dry-run (or --device cpu) on a CPU machine." >&2
  exit 2
fi

start=$(date +%s)
if [[ "$full" == 1 ]]; then
  profile=(--profile full)
  model_groups=("resnet18" "resnet18in vit")  # the CIFAR stem first: the cells no CPU run can finish
  results=bench/results/quality_full
  if [[ "$dry_run" == 1 ]]; then
    scratch=$(mktemp -d)
    results="$scratch/quality_smoke"
    profile=(--profile smoke --max_cells 1 --work_dir "$scratch/work")
    model_groups=("resnet18")
  fi
  deadline=$(( start + full_seconds ))
  for models in "${model_groups[@]}"; do
    left=$(( deadline - $(date +%s) ))
    (( left > 60 )) || break
    # shellcheck disable=SC2086 # one word per model
    timeout "$left" python bench/quality.py "${profile[@]}" --models $models --data_dir "$data_dir" \
      --results "$results" || echo "gpu.sh: full grid ($models) stopped (exit $?); finished cells are kept" >&2
  done
  python bench/quality.py "${profile[@]}" --models resnet18 resnet18in vit --results "$results" --list || true
  if [[ -n "${OUT:-}" ]]; then
    copied="$OUT/results/$(basename "$results")"  # quality_smoke for a dry run, never mistaken for real cells
    mkdir -p "$copied"
    cp "$results"/*.json "$copied/" || true
  fi
  echo "gpu.sh: done in $(( $(date +%s) - start )) s; results in $results${OUT:+ (copied to ${copied:-})}"
  exit 0
fi
if [[ "$dry_run" == 1 ]]; then
  scratch=$(mktemp -d)
  results="$scratch/results"
  for model in resnet18 vit; do
    python bench/overhead.py --device cpu --model "$model" --batch-sizes 4 --rounds 2 --warmup 1 \
      --output "$results/overhead_smoke_$model.json"
  done
  python bench/quality.py --profile smoke --data_dir "$data_dir" --results "$results/quality_smoke" \
    --work_dir "$scratch/work" --only resnet18_fp_s0 vit_osc3_lam10_s0
  python bench/aggregate.py --results "$results/quality_smoke" --document "$results/quality_smoke/RESULTS.md" \
    --figures "$results/quality_smoke"
else
  results=bench/results
  for model in resnet18 vit; do
    timeout "$overhead_seconds" python bench/overhead.py --device "$device" --model "$model" --batch-sizes 256 128 \
      || echo "gpu.sh: overhead bench ($model) stopped (exit $?)" >&2
  done
  # Cells are written one by one: whatever finishes inside the time limit is kept, the rest is listed as missing.
  timeout "$quality_seconds" python bench/quality.py --profile gpu --data_dir "$data_dir" --max_cells 6 \
    || echo "gpu.sh: quality grid stopped (exit $?); finished cells are kept" >&2
  python bench/aggregate.py --results "$results/quality_gpu" --document "$results/quality_gpu/RESULTS.md" \
    --figures "$results/quality_gpu"
  python bench/quality.py --profile gpu --list
fi
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT/results"
  cp -r "$results"/. "$OUT/results/"
fi
echo "gpu.sh: done in $(( $(date +%s) - start )) s; results in $results${OUT:+ (copied to $OUT/results)}"
