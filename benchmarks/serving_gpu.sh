#!/usr/bin/env bash
# Serving benchmark on a GPU machine that holds no model weights: writes a random checkpoint of
# a 7B shape (tokenizer files copied from TOKENIZER_DIR), calibrates uniform CATS thresholds for
# it on generated text, then runs bench_serving.py against `cats-serve` at dense and each level.
#   TOKENIZER_DIR=dir RESULTS=benchmarks/results/bench_serving_h200_2048.json benchmarks/serving_gpu.sh
set -euo pipefail
SHAPE=${SHAPE:-llama2-7b}
WORK=${WORK:-/tmp/cats-serving-$SHAPE}
RESULTS=${RESULTS:-benchmarks/results/bench_serving_gpu.json}
LEVELS=${LEVELS:-"0.5 0.7"}
CONCURRENCY=${CONCURRENCY:-"1 8 32"}
NUM_REQUESTS=${NUM_REQUESTS:-64}
OUTPUT_LEN=${OUTPUT_LEN:-fixed:128}
MAX_BATCH=${MAX_BATCH:-32}
MAX_SEQ_LEN=${MAX_SEQ_LEN:-2048}  # the server's default cache length
# SERVER_ARGS: more cats-serve flags, e.g. --no-pipeline-steps
here=$(dirname "$0")

python "$here/random_checkpoint.py" --shape "$SHAPE" --tokenizer "$TOKENIZER_DIR" \
    --out "$WORK/model"
# Word-salad paragraphs: random weights make any text as good as any other for quantiles.
python -c 'import random, sys
r = random.Random(0)
words = "the of and to in a is was for on that with as by at from his her it be are not".split()
print("\n\n".join(" ".join(r.choices(words, k=200)) for _ in range(400)))' >"$WORK/text.txt"
# shellcheck disable=SC2086
# --criterion silu: the paper's criterion, as in the committed results/bench_serving_h200*.json
cats-calibrate --model "$WORK/model" --mode uniform --criterion silu --sparsity $LEVELS \
    --data "$WORK/text.txt" --max-tokens 16384 --heldout-tokens 4096 --no-progress \
    --out "$WORK/thresholds"
# shellcheck disable=SC2086
python "$here/bench_serving.py" --launch --concurrency $CONCURRENCY --sparsity 0 $LEVELS \
    --num-requests "$NUM_REQUESTS" --output-len "$OUTPUT_LEN" --out "$RESULTS" -- \
    --model "$WORK/model" --thresholds "$WORK"/thresholds/*.json --max-batch-size "$MAX_BATCH" \
    --max-seq-len "$MAX_SEQ_LEN" --log-level warning ${SERVER_ARGS:-}
