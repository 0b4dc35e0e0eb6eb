#!/usr/bin/env bash
# Sets radixserve up on a fresh Debian/Ubuntu machine with Python 3.11, then runs one task:
#   demo  the main job: pull the default model and answer a demo prompt with it
#   test  the test suite
# Idempotent: a second run reuses .venv and the model cache.
set -euo pipefail
cd "$(dirname "$0")/.."

task="${1:-demo}"
python="${PYTHON:-python3.11}"

if ! "$python" -m venv --help >/dev/null 2>&1 || ! "$python" -c 'import ensurepip' >/dev/null 2>&1; then
    echo "==> installing Python venv support (apt-get)"
    apt-get update -qq && apt-get install -y -qq python3.11-venv
fi
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
echo "==> installing torch (CPU) and radixserve"
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e ".[test]"

echo "==> pulling the default model"
.venv/bin/radixserve model pull

case "$task" in
    demo)
        .venv/bin/radixserve generate "In one sentence, why does caching a shared prompt prefix speed up LLM serving?" \
            --max-tokens 64
        ;;
    test)
        .venv/bin/python -m pytest -q -p no:cacheprovider
        ;;
    *)
        echo "usage: $0 demo|test" >&2
        exit 2
        ;;
esac
