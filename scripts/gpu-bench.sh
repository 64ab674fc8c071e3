#!/usr/bin/env bash
# Engine benchmark on a GPU host that has torch, transformers, accelerate and pillow but not
# this project's other dependencies (the lent H100/H200 machines, for example).
#
#   scripts/gpu-bench.sh wheels      # on a machine with PyPI access: fetch wheels into .whl/
#   scripts/gpu-bench.sh run [8b]    # on the GPU host, in the repository root
#
# "run" installs the carried wheels into /tmp/site and prints the JSON reports of
# `caption-worker bench --mode engine` (also written to $OUT): Qwen3-VL random weights of the
# given shape, SDNQ uint4 + SVD r32, 1024x1024 images, 128 generated tokens, one image at a
# time against 32 at once, for the generate engine and for the slot engine with each weight
# form (sdnq, bf16, int8). The whole-path mode needs Redis and S3 there too; not run here.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
wheels)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl sdnq==0.2.8 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 \
        annotated-types typing-inspection python-dotenv \
        boto3 botocore s3transfer jmespath python-dateutil six urllib3
    ;;
run)
    shape="${2:-8b}"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    out="${OUT:-/tmp}"
    # One random model of the shape, built once; then each engine and weight form on it,
    # each run bounded so one slow form cannot spend the whole device budget.
    for run in "generate sdnq" "slots sdnq" "slots bf16" "slots int8"; do
        set -- $run
        timeout "${RUN_LIMIT_S:-150}" python3 -m worker.cli bench --mode engine \
            --random-shape "$shape" --models-dir /tmp/bench-models --engine "$1" \
            --weights "$2" --image-px 1024 --new-tokens 128 --tasks 64 --max-batch 32 \
            --json-out "$out/bench-$shape-$1-$2.json" || echo "run $run: exit $?"
    done
    ;;
*)
    sed -n 2,12p "$0"
    exit 2
    ;;
esac
