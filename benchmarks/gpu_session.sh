#!/usr/bin/env bash
# The GPU runs that the open issues still need, in one driver, for the device machine (one H200, no network):
#   bash benchmarks/gpu_session.sh tests battery var16 var30 t2i code sample lora     (logs and JSON in $OUT/gpu_session.tgz)
# Stages: tests (tests/test_gpu.py; TESTS_K: pytest -k), battery (diffusers' accelerator tests, issue 24), var16 / var30 / t2i (the fast
# path before (.baseline) and after the pipeline-shape change, issue 16; profile1: VAR-d16 batch 1 of both with
# torch.profiler tables), code (CoDe vs VAR-d30, issue 23), sample
# (issue 19: SAMPLE_MODELS, default var-d16 var-d30; SAMPLE_BATCHES, default 20), lora (LoRA vs full fine-tuning memory, issue 18: LORA_MODELS,
# default var-d30 infinity-2b), batches (issue 20: batch sizes in one process against each alone; BATCHES_MODELS,
# BATCHES_ALONE), startup (issue 20: time to the first fast images of a second process, compile cache),
# train_original (issue 20: the original VAR trainer against ours), decoder (the image decoder alone), autotune (the decoder
# compiled in max-autotune mode inside the pipeline), subpixel (the decoder's upsamplers as one 2x2 conv on the small
# map), code8 (CoDe N = 8 against VAR-d30, batch 64, both decoders), cudnn (cudnn.benchmark on / off at batch 64),
# fp8_t2i (float8 matmuls for Infinity-2B and STAR-d30), star_all, t2i_all, star_debug (STAR's compiled blocks
# on CUDA, variant by variant), side_by_side (the original VAR code's inference and ours in one call, issue 20),
# profile_ours (torch.profiler tables of today's code), attention (SDPA kernels on a generation's shapes), sdpa (the
# pipelines with cuDNN's attention kernel first), chain (VAR's blocks chained across block boundaries against each on its own;
# CHAIN_SIDES also static-tokens / static: compile_blocks' shapes), trace (dynamo's tracing per shapes), kv_writes (Infinity's and STAR's in-piece
# KV-cache writes against the cache's copies), star_query (STAR's cross-attention query compiled on CUDA: the fixture
# test, then STAR-d30's time; carry .fixtures/star.tar.xz), persistent (Inductor's one-pass row reductions: the
# float8 quantisation of fc2's input, LayerNorms; Infinity-2B and STAR-d30 at batch 1), gnsums_t2i (the decoder's
# GroupNorm sums at batch 1 for the 1024 px models; GN_MODELS, GN_MODES), fp8rows, fp8rows_var (float8 from 2,048 token
# rows against 4,096), cudnn_t2i (cudnn.benchmark for the 1024 px decoder),
# syncs (where a generation waits for the GPU; SYNC_MODELS), graph_sampling (STAR / Infinity sampling inside the
# whole-scale graphs against eager sampling; GRAPH_SAMPLING_MODELS), host_start (the start of a call, .baseline against
# today's code; HOST_MODELS, HOST_BATCHES, HOST_MODE).
# startup: STARTUP_COMPILE_BLOCKS, sample's --compile-blocks.
# What it needs next to the checkout (git-ignored, carried to the device):
#   .whl/               pip download diffusers==0.42.1 importlib_metadata --no-deps -d .whl   (the image has no diffusers)
#   .fixtures/F.tar.xz  for F in var star infinity code; do tar -cJf .fixtures/$F.tar.xz -C ../shared fixtures/$F; done
#                       (tests/test_gpu.py needs all four, the battery star and infinity for its tiny text towers;
#                       carry only those a call needs, e.g. carry [".whl", ".fixtures/star.tar.xz",
#                       ".fixtures/infinity.tar.xz"]: the tree and its carries travel within 64 MiB, so the tests
#                       stage runs in two calls, each skipping (and saying so) the families it lacks; the battery
#                       fails on a missing fixture instead of skipping: DIFFUSERS_VAR_REQUIRE_FIXTURES=1)
#   .fixtures/var_code.tar.xz   the VAR and CoDe fixtures in one archive, their shared vae.pth stored once (a hard
#                       link): both fit the carry beside .whl (cp -r ../shared/fixtures/{var,code} to a folder, replace
#                       code/vae.pth by `ln var/vae.pth code/vae.pth`, tar -cJf of its fixtures/)
#   .baseline/          mkdir .baseline && git archive 92e0b11 src benchmarks | tar -x -C .baseline   (the code before)
#   .originals/VAR      git clone https://github.com/FoundationVision/VAR .originals/VAR   (train_original: carry it)
set -u
cd "$(dirname "$0")/.."
if [ ! -d /tmp/site/diffusers ]; then  # byte-compiled as a user's pip install is: start-up times the imports
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
fi
python3 -m compileall -q src >/dev/null 2>&1  # in case the image does not write bytecode (PYTHONDONTWRITEBYTECODE)
mkdir -p /tmp/fx
for archive in .fixtures/*.tar.xz; do
  [ -f "$archive" ] && [ ! -d "/tmp/fx/fixtures/$(basename "$archive" .tar.xz)" ] && tar -xJf "$archive" -C /tmp/fx
done
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export DIFFUSERS_VAR_FIXTURES=/tmp/fx/fixtures
# The device returns at most 8 files from $OUT, and what is there when a call runs past its limit: the stages write
# into a folder of their own, packed into $OUT/gpu_session.tgz after every stage and every minute (weights left out).
# Do not pack $OUT yourself after this script: that would replace its archive.
RESULTS=$OUT
OUT=$(mktemp -d /tmp/gpu_session.XXXXXX)
pack() {  # $1: the part file's name (each packer its own); tar's status 1 is a log that grew while it was read
  local part="$RESULTS/.gpu_session.$1.part"
  tar -czf "$part" -C "$OUT" --warning=no-file-changed --exclude='*.safetensors' --exclude=checkpoints \
    --exclude=final --exclude=tokenizer . 2>/dev/null
  [ $? -le 1 ] && mv -f "$part" "$RESULTS/gpu_session.tgz"
}
(while sleep 60; do pack minute; done) &
packer=$!
trap 'kill $packer 2>/dev/null; pack final; rm -f "$RESULTS"/.gpu_session.*.part; rm -rf "$OUT"' EXIT
log() { echo "=== $(date +%T) $*"; }
bench() {  # tree name args...
  local tree=$1 name=$2; shift 2
  log "bench $tree $name $*"
  (cd "$tree" && PYTHONPATH=/tmp/site:$PWD/src timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/bench_pipelines.py --json "$OUT/$name.json" "$@") \
    > "$OUT/$name.log" 2>&1; tail -n 12 "$OUT/$name.log" | grep -v "^\s*$"
}
for stage in "$@"; do
  case $stage in
    tests)
      log tests; timeout 300 python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider -s -rfEs ${TESTS_K:+-k "$TESTS_K"} \
        > "$OUT/gpu_tests.log" 2>&1
      grep -E "agreement|passed|failed|FAILED|ERROR|SKIPPED" "$OUT/gpu_tests.log" | head -30 ;;
    battery)
      log battery; DIFFUSERS_VAR_REQUIRE_FIXTURES=1 timeout 240 python3 -m pytest tests/test_diffusers_battery.py -q -p no:cacheprovider -rfEs \
        -k "${BATTERY_K:-float16 or to_device or to_dtype or offload or forward_pass_twice or group or device_map}" > "$OUT/battery.log" 2>&1
      grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/battery.log" | head -40 ;;
    var16)
      bench .baseline old_var16 --models var-d16 --batch-sizes 1,64 --modes fast-compile-all --repeats 5
      bench . new_var16 --models var-d16 --batch-sizes 1,64 --modes fast-compile-all --repeats 5 ;;
    host_start)  # issue 20: the host's work at the start of a call (diffusers' execution-device walks), .baseline against
      # today's code on one machine (HOST_MODELS, default var-d16; HOST_BATCHES, default 1; HOST_MODE, default fast-compile-all)
      for model in ${HOST_MODELS:-var-d16}; do
        for side in .baseline .; do
          bench "$side" "host_${model}_$([ "$side" = . ] && echo new || echo old)" --models "$model" \
            --batch-sizes "${HOST_BATCHES:-1}" --modes "${HOST_MODE:-fast-compile-all}" --repeats 5
        done
      done ;;
    profile1)  # VAR-d16 batch 1 before / after with torch.profiler tables: where the +7.5% of session 8 goes
      bench .baseline old_var16_profile --models var-d16 --batch-sizes 1 \
        --modes fast-compile-all --repeats 5 --profile
      bench . new_var16_profile --models var-d16 --batch-sizes 1 --modes fast-compile-all --repeats 5 --profile
      grep -h "profile:" "$OUT"/*_var16_profile.log ;;
    side_by_side)  # issue 20: the original VAR code and ours (fast-compile-all), one model per process, in one call (carry .originals/VAR)
      models=${SIDE_MODELS:-var-d16,var-d30}
      for model in ${models//,/ }; do  # one process per model: the original's VAR-d30 after its VAR-d16 in one process hit a
        # device-side assert in its sampler (inf / nan probabilities) at its first generation (H100, session 18)
        log original "$model"; timeout "${ORIGINAL_TIMEOUT:-300}" python3 benchmarks/bench_original_inference.py \
          --original .originals/VAR --models "$model" --batch-sizes "${SIDE_BATCHES:-1,64}" --json "$OUT/original_$model.json" \
          > "$OUT/original_$model.log" 2>&1; grep "^|" "$OUT/original_$model.log"
      done
      for model in ${models//,/ }; do
        bench . "ours_$model" --models "$model" --batch-sizes "${SIDE_BATCHES:-1,64}" --modes fast-compile-all --repeats 5
      done ;;
    chain)  # issue 20: VAR's blocks chained across block boundaries (fast-compile-all) against each block on its own, one process each
      for model in ${CHAIN_MODELS:-var-d16 var-d30}; do
        for side in ${CHAIN_SIDES:-unchained chained}; do  # unchained, chained, kvcopy, gelu-always, static-tokens, static
          mode=fast-compile-all; [ "$side" = chained ] || mode=fast-compile-all-$side
          bench . "chain_${model}_$side" --models "$model" --batch-sizes "${CHAIN_BATCHES:-1,64}" --modes "$mode" --repeats 5
        done
      done ;;
    profile_ours)  # issue 20: VAR-d16 batches 1 and 64, today's code only, torch.profiler tables and GPU timeline
      # (PROFILE_MODEL: one or more models, one process each; PROFILE_BATCH, PROFILE_MODE; PROFILE_TRACE=1: each
      # traced generation's kernels with their issuing lines, for benchmarks/read_trace.py)
      for model in ${PROFILE_MODEL:-var-d16}; do
        bench . "profile_$model" --models "$model" --batch-sizes "${PROFILE_BATCH:-1,64}" \
          --modes "${PROFILE_MODE:-fast-compile-all}" --repeats 5 --profile ${PROFILE_TRACE:+--trace "$OUT/trace.json.gz"}
        grep -h -A8 "profile:" "$OUT/profile_$model.log" | grep -E "profile:|^    "
      done ;;
    attention)  # issue 20: the SDPA kernels (flash, memory-efficient, cuDNN) on one generation's self-attention shapes
      log attention; timeout 240 python3 benchmarks/bench_attention.py --batch-sizes "${ATTENTION_BATCHES:-1,4,64}" \
        --models "${ATTENTION_MODELS:-var-d16,var-d30,star-d30,infinity-2b}" --json "$OUT/attention.json" > "$OUT/attention.log" 2>&1
      grep -E "^\||GPU|Error" "$OUT/attention.log" ;;
    sdpa)  # issue 20: the pipelines with cuDNN's attention kernel tried first against PyTorch's default, one process each
      # (SDPA_MODEL, SDPA_BATCHES; SDPA_SIDES: default, sdpa-KERNEL (bench_pipelines.py --sdpa-first KERNEL: the
      # others stay as fallbacks) or a diffusers backend name (--attention-backend; its _native_* pin one kernel with no
      # fallback, and cuDNN's refuses the first scale's single key))
      if [ -n "${SDPA_IF_FASTER:-}" ] && [ -f "$OUT/attention.json" ] && ! python3 - "$OUT/attention.json" "${SDPA_MODEL:-infinity-2b}" <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1])) if r["model"] == sys.argv[2] and r["batch"] == 1]
ms = lambda r, k: r[k]["ms_over_common_scales"] if r["common_scales"] else float("inf")
sys.exit(0 if rows and ms(rows[0], "cudnn") < 0.95 * ms(rows[0], "default") else 1)
PY
      then
        echo "sdpa: skipped (SDPA_IF_FASTER: cuDNN's kernel is not 5% faster than the default on ${SDPA_MODEL:-infinity-2b}'s attention)"
      else
      for side in ${SDPA_SIDES:-default sdpa-cudnn}; do
        case $side in default) flag="" ;; sdpa-*) flag="--sdpa-first ${side#sdpa-}" ;; *) flag="--attention-backend $side" ;; esac
        BENCH_TIMEOUT=${BENCH_TIMEOUT:-290} bench . "sdpa_${SDPA_MODEL:-infinity-2b}_$side" --models "${SDPA_MODEL:-infinity-2b}" \
          --batch-sizes "${SDPA_BATCHES:-1}" --modes fast-compile-all --repeats 5 $flag
      done
      fi ;;
    var30)
      bench .baseline old_var30 --models var-d30 --batch-sizes 1,64 --modes fast-compile-all --repeats 5
      bench . new_var30 --models var-d30 --batch-sizes 1,64 --modes fast-compile-all --repeats 5 ;;
    t2i)
      bench .baseline old_star --models star-d30 --batch-sizes 1 --modes fast --repeats 5
      bench . new_star --models star-d30 --batch-sizes 1 --modes fast --repeats 5
      bench .baseline old_inf --models infinity-2b --batch-sizes 1 --modes fast --repeats 5
      bench . new_inf --models infinity-2b --batch-sizes 1 --modes fast --repeats 5 ;;
    star_all)  # issue 20: STAR-d30 1024 px batch 1 with its blocks compiled (new: compile_blocks for STAR) against fast
      # (STAR_ALL_ARGS: more bench_pipelines.py arguments)
      BENCH_TIMEOUT=${BENCH_TIMEOUT:-400} bench . star_all --models star-d30 --batch-sizes 1 --modes fast,fast-compile-all --repeats 5 ${STAR_ALL_ARGS:-} ;;
    t2i_all)  # issue 16: Infinity-2B under fast-compile-all at batch 1 and 4, before / after (the README table's rows)
      BENCH_TIMEOUT=${BENCH_TIMEOUT:-290} bench .baseline old_inf_all --models infinity-2b --batch-sizes 1,4 --modes fast-compile-all --repeats 5
      BENCH_TIMEOUT=${BENCH_TIMEOUT:-290} bench . new_inf_all --models infinity-2b --batch-sizes 1,4 --modes fast-compile-all --repeats 5 ;;
    code)  # issue 23: one model per process, the decoder in slices of 16 on every side (session 9)
      for model in var-d30 code-d30-d16-n8 code-d30-d16-n6; do
        bench . "code_$model" --models "$model" --batch-sizes 1,64 --modes eager-fp16,fast,fast-compile-all \
          --decode-slice 16 --repeats 3
      done ;;
    sample)
      for model in ${SAMPLE_MODELS:-var-d16 var-d30}; do
        log sample "$model"; timeout "${SAMPLE_TIMEOUT:-300}" python3 benchmarks/bench_sample.py --models "$model" --batch-size 64 \
          --batches "${SAMPLE_BATCHES:-20}" --no-reference --json "$OUT/sample_$model.json" > "$OUT/sample_$model.log" 2>&1
        tail -n 12 "$OUT/sample_$model.log"
      done ;;
    batches)  # issue 20: batch sizes one after another in one process against each alone (recompiles, slowdown)
      for model in ${BATCHES_MODELS:-var-d16 infinity-2b}; do
        sizes=$([ "$model" = infinity-2b ] && echo 1,2,4 || echo 1,4,16,64)
        TORCH_LOGS=recompiles bench . "batches_${model}_together" --models "$model" --batch-sizes "$sizes" \
          --modes fast-compile-all --repeats 5
        grep -c "Recompiling function" "$OUT/batches_${model}_together.log"
        alone=${BATCHES_ALONE:-$sizes}  # BATCHES_ALONE: the sizes also run alone, e.g. 1,4 (default all)
        for size in ${alone//,/ }; do
          bench . "batches_${model}_alone_$size" --models "$model" --batch-sizes "$size" --modes fast-compile-all --repeats 5
        done
      done ;;
    train_original)  # issue 20: the original VAR trainer against ours (TRAIN_SIDES), VAR-d16 256 px, batch 96, fp16 (carry .originals/VAR)
      log train_original "${TRAIN_SIDES:=original}"; TORCH_LOGS=${TORCH_LOGS-recompiles,graph_breaks} timeout "${TRAIN_TIMEOUT:-560}" \
        python3 benchmarks/bench_training_original.py \
        --original .originals/VAR --steps "${TRAIN_STEPS:-300}" --sides "$TRAIN_SIDES" --out "$OUT/train_original" > "$OUT/train_original.log" 2>&1
      tail -n 9 "$OUT/train_original.log"  # pack() leaves the weights out
      grep -c -E "Recompiling function|Graph break" "$OUT"/train_original/*.log ;;  # per side's log
    autotune)  # issues 20, 23: the decoder compiled in max-autotune mode inside the pipeline, against the default mode
      BENCH_TIMEOUT=${BENCH_TIMEOUT:-400} bench . autotune_var16 --models var-d16 --batch-sizes 1,64 \
        --modes fast-compile-all,fast-compile-all-autotune --repeats 5
      BENCH_TIMEOUT=${BENCH_TIMEOUT:-400} bench . autotune_var30 --models var-d30 --batch-sizes 64 \
        --modes fast-compile-all,fast-compile-all-autotune --repeats 3 ;;
    decoder)  # issues 20, 23: the image decoder alone, layouts and compile modes, batch 1 and 64
      log decoder; timeout 300 python3 benchmarks/bench_decoder.py --batch-sizes 1,64 > "$OUT/decoder.log" 2>&1; tail -n 12 "$OUT/decoder.log" ;;
    subpixel)  # issues 20, 23: the upsamplers in sub-pixel form (fast_inference.subpixel_upsample_), decoder alone and inside
      log subpixel_decoder; timeout 240 python3 benchmarks/bench_decoder.py --batch-sizes 1,64 \
        --variants bf16-nchw-eager,bf16-nchw-eager-subpixel,bf16-cl-compile-padded,bf16-cl-compile-padded-subpixel \
        > "$OUT/subpixel_decoder.log" 2>&1; tail -n 10 "$OUT/subpixel_decoder.log"
      bench . subpixel_var16 --models var-d16 --batch-sizes 1,64 --modes fast-compile-all,fast-compile-all-subpixel --repeats 5
      bench . subpixel_var30 --models var-d30 --batch-sizes 64 --modes fast-compile-all,fast-compile-all-subpixel --repeats 3 ;;
    cudnn)  # issues 20, 23: cudnn.benchmark for the decoder's convolutions, batch 64, off / on in two processes per model
      # (CUDNN_MODELS, CUDNN_MODES: bench_pipelines.py --modes, default fast-compile-all; CUDNN_SIDES: off on)
      for model in ${CUDNN_MODELS:-var-d30 code-d30-d16-n8}; do
        for side in ${CUDNN_SIDES:-off on}; do
          flag=""; [ "$side" = on ] && flag=--cudnn-benchmark
          BENCH_TIMEOUT=${BENCH_TIMEOUT:-200} bench . "cudnn_${model}${flag:+_on}" --models "$model" --batch-sizes 64 \
            --modes "${CUDNN_MODES:-fast-compile-all}" --decode-slice 16 --repeats 5 $flag
        done
      done ;;
    fp8_t2i)  # issue 20: float8 block matmuls for Infinity-2B and STAR-d30 at 1024 px against bf16, one model per process
      TORCH_LOGS=recompiles BENCH_TIMEOUT=${BENCH_TIMEOUT:-290} bench . fp8_inf --models infinity-2b --batch-sizes 1,4 \
        --modes fast-compile-all,fast-compile-all-fp8 --repeats 5
      echo "recompiles: $(grep -c 'Recompiling function' "$OUT/fp8_inf.log"), recompile limit hit: $(grep -c 'hit config.recompile_limit' "$OUT/fp8_inf.log")"
      BENCH_TIMEOUT=${BENCH_TIMEOUT:-290} bench . fp8_star --models star-d30 --batch-sizes 1 \
        --modes fast-compile-all,fast-compile-all-fp8 --repeats 5 ;;
    kv_writes)  # issue 20: Infinity's and STAR's projection pieces writing the KV cache themselves against the cache's
      # copies, at 1024 px batch 1 in their fastest mode, one model per process (KV_MODELS, default both)
      for model in ${KV_MODELS:-infinity-2b star-d30}; do
        BENCH_TIMEOUT=${BENCH_TIMEOUT:-300} bench . "kv_$model" --models "$model" --batch-sizes 1 \
          --modes fast-compile-all-static-tokens-fp8,fast-compile-all-static-tokens-fp8-kvcopy --repeats 5
      done ;;
    star_query)  # issue 20: STAR's cross-attention query compiled on CUDA: the fixture's near-tie rule, then its speed
      log star_query; timeout 300 python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider -s -rfEs \
        -k compiled_blocks_on_the_converted_fixture > "$OUT/star_query_tests.log" 2>&1
      grep -E "agreement|passed|failed|FAILED|ERROR|SKIPPED" "$OUT/star_query_tests.log" | head -10
      BENCH_TIMEOUT=${BENCH_TIMEOUT:-300} bench . star_query --models star-d30 --batch-sizes 1 \
        --modes fast-compile-all-static-tokens-fp8-plainquery,fast-compile-all-static-tokens-fp8 --repeats 5 ;;
    persistent)  # issue 20: Inductor's row reductions in one pass (fc2's float8 input, LayerNorms over 1,920-2,048
      # features) against the default's two loops, 1024 px batch 1, one model per process (PERSIST_MODELS, default both)
      for model in ${PERSIST_MODELS:-infinity-2b star-d30}; do
        BENCH_TIMEOUT=${BENCH_TIMEOUT:-300} bench . "persistent_$model" --models "$model" --batch-sizes 1 \
          --modes fast-compile-all-static-tokens-fp8,fast-compile-all-static-tokens-fp8-persistent --repeats 5
      done ;;
    gnsums_t2i)  # issue 20: the decoder's GroupNorm sums at batch 1 for the 1024 px models (a 1024 px image is as many
      # positions as 16 of 256 px): on maps of 512 x 512 and more, on every map, against the default; one model per process
      for model in ${GN_MODELS:-infinity-2b star-d30}; do
        BENCH_TIMEOUT=${BENCH_TIMEOUT:-450} bench . "gnsums_$model" --models "$model" --batch-sizes 1 --repeats 5 \
          --modes "${GN_MODES:-fast-compile-all-static-tokens-fp8,fast-compile-all-static-tokens-fp8-gnsums-large,fast-compile-all-static-tokens-fp8-gnsums}"
      done ;;
    fp8rows)  # issue 20: the float8 matmuls from 2,048 token rows (the 1024 px models' 32 x 32 and 40 x 40 scales at
      # batch 1) against 4,096, one model per process (FP8ROWS_MODELS, default both)
      for model in ${FP8ROWS_MODELS:-star-d30 infinity-2b}; do
        BENCH_TIMEOUT=${BENCH_TIMEOUT:-280} bench . "fp8rows_$model" --models "$model" --batch-sizes 1 --repeats 5 \
          --modes fast-compile-all-static-tokens-fp8-fp8rows4096,fast-compile-all-static-tokens-fp8
      done ;;
    fp8rows_var)  # issue 20: the same for VAR-d30 at batch 64, static shapes (its 4 x 4 and 5 x 5 scales: 2,048 and
      # 3,200 rows)
      BENCH_TIMEOUT=${BENCH_TIMEOUT:-400} bench . fp8rows_var-d30 --models var-d30 --batch-sizes 64 --repeats 5 \
        --modes fast-compile-all-static-fp8-fp8rows4096,fast-compile-all-static-fp8 ;;
    cudnn_t2i)  # issue 20: cudnn.benchmark for STAR-d30's (CUDNN_T2I_MODELS) 1024 px decoder at batch 1, off / on
      for model in ${CUDNN_T2I_MODELS:-star-d30}; do
        for flag in "" --cudnn-benchmark; do
          BENCH_TIMEOUT=${BENCH_TIMEOUT:-200} bench . "cudnn_t2i_$model${flag:+_on}" --models "$model" --batch-sizes 1 \
            --repeats 5 --modes fast-compile-all-static-tokens-fp8 $flag
        done
      done ;;
    graph_sampling)  # issue 20: STAR / Infinity sampling inside the whole-scale CUDA graphs against eager sampling after
      # the graphed transformer step, one model per process (GRAPH_SAMPLING_MODELS; the 1024 px models sample eagerly
      # in both modes since session 32: raise fast_inference.WHOLE_SCALE_SAMPLING_MAX_TOKENS to compare them)
      for model in ${GRAPH_SAMPLING_MODELS:-star-d16}; do
        batches=1; [ "$model" = infinity-2b ] && batches=1,4; [ "$model" = star-d16 ] && batches=1,64
        [ "$model" = infinity-2b-256 ] && batches=1,16
        BENCH_TIMEOUT=${BENCH_TIMEOUT:-280} bench . "graph_sampling_$model" --models "$model" --batch-sizes "$batches" \
          --repeats 5 --modes fast-compile-all-static-tokens-fp8-eagersampling,fast-compile-all-static-tokens-fp8
      done ;;
    syncs)  # issue 20: where a generation waits for the GPU (torch's sync debug mode), 1024 px models at batch 1 and
      # VAR-d16 at batch 1 (SYNC_MODELS), their fastest mode: profiles showed 18-20 ms idle at batch 1 in the t2i models
      for model in ${SYNC_MODELS:-star-d30 infinity-2b var-d16}; do
        mode=fast-compile-all-static-tokens-fp8; [ "$model" = var-d16 ] && mode=fast-compile-all
        BENCH_TIMEOUT=${BENCH_TIMEOUT:-200} bench . "syncs_$model" --models "$model" --batch-sizes 1 --repeats 2 \
          --modes "$mode" --sync-debug
        grep "sync-debug" "$OUT/syncs_$model.log"
      done ;;
    star_debug)  # issue 20: where STAR's compiled blocks went wrong on CUDA (the cross-attention query)
      log star_debug; timeout "${STAR_DEBUG_TIMEOUT:-560}" python3 benchmarks/debug_star_compile.py \
        ${STAR_DEBUG_VARIANTS:+--variants "$STAR_DEBUG_VARIANTS"} ${STAR_DEBUG_ARGS:-} > "$OUT/star_debug.log" 2>&1
      grep -v "^W[0-9]" "$OUT/star_debug.log" | tail -n 12 ;;
    code8)  # issue 23: CoDe N = 8 against VAR-d30 at batch 64, default decoder and sub-pixel upsamplers
      for model in var-d30 code-d30-d16-n8; do
        BENCH_TIMEOUT=${BENCH_TIMEOUT:-280} bench . "code8_$model" --models "$model" --batch-sizes 64 \
          --modes fast-compile-all,fast-compile-all-subpixel --decode-slice 16 --repeats 5
      done ;;
    trace)  # issue 20: dynamo's tracing per compile_blocks shapes (not saved by the compile caches), VAR-d16 on this host
      log trace; timeout 300 python3 benchmarks/bench_trace.py --models "${TRACE_MODELS:-var-d16}" --device cuda \
        --json "$OUT/trace.json" > "$OUT/trace.log" 2>&1; tail -n 8 "$OUT/trace.log" ;;
    startup)  # issue 20: a second process's time to its first fast images with the compile cache the first left
      log startup; python3 -c "import sys; print('writes bytecode:', not sys.dont_write_bytecode)" | tee "$OUT/bytecode.txt"
      timeout "${STARTUP_TIMEOUT:-420}" python3 benchmarks/bench_startup.py --models "${STARTUP_MODELS:-var-d16}" \
        ${STARTUP_COMPILE_BLOCKS:+--compile-blocks "$STARTUP_COMPILE_BLOCKS"} --processes 3 --warm-env TORCHINDUCTOR_COMPILE_THREADS=1 --json "$OUT/startup.json" > "$OUT/startup.log" 2>&1; tail -n 9 "$OUT/startup.log" ;;
    lora)
      for model in ${LORA_MODELS:-var-d30 infinity-2b}; do
        log lora "$model"; timeout "${LORA_TIMEOUT:-240}" python3 benchmarks/bench_lora_training.py --model "$model" \
          --out "$OUT" > "$OUT/lora_$model.log" 2>&1
        tail -n 12 "$OUT/lora_$model.log"
      done ;;
    *)
      echo "unknown stage: $stage (see the list at the top of benchmarks/gpu_session.sh)" ;;
  esac
  pack stage
done
log end
