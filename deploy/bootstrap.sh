#!/usr/bin/env bash
# Sets radixserve up on a fresh Debian/Ubuntu machine with Python 3.11, then runs one task:
#   demo  the main job: start the cluster in the background (Ray, 2 workers, the router) on its embedded defaults
#         with the default model, answer a demo request through the router and show `radixserve status`
#   test  the test suite
# Idempotent: a second run reuses .venv and the model cache.
set -euo pipefail
cd "$(dirname "$0")/.."

task="${1:-demo}"
python="${PYTHON:-python3.11}"

# System packages: venv support, a C++ compiler plus Python headers for the native kernels (compiled on first use), Prometheus,
# Redis.
missing=()
"$python" -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3.11-venv)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
[ -f "$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] || missing+=(python3.11-dev)
# Prometheus (and promtool): the observability tests scrape the cluster with a real one.
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
# redis-server: the shared bus of several routers (`up --routers N` starts a local one); tests start real ones.
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing ${missing[*]} (apt-get)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    "$python" -m venv .venv
fi
echo "==> installing torch (CPU) and radixserve"
# torch through pip, which honours the machine's pip configuration (a local CPU build, a mirror); the rest through
# uv, which fetches and installs in parallel: about 15 s on a fresh machine where pip took two minutes.
.venv/bin/python -m pip install --disable-pip-version-check -q torch==2.13.0 "uv>=0.5"
.venv/bin/python -m uv pip install --python .venv/bin/python -q -e ".[test]"

echo "==> pulling the default model"
.venv/bin/radixserve model pull

case "$task" in
    demo)
        .venv/bin/radixserve down >/dev/null  # a cluster left by an earlier run of this script
        .venv/bin/radixserve up --detach
        .venv/bin/radixserve generate "In one sentence, why does caching a shared prompt prefix speed up LLM serving?" \
            --max-tokens 64
        .venv/bin/radixserve status
        echo "==> the cluster keeps running: try .venv/bin/radixserve generate \"...\"; stop it with .venv/bin/radixserve down"
        ;;
    test)
        .venv/bin/python -m pytest -q -p no:cacheprovider --durations=25
        ;;
    *)
        echo "usage: $0 demo|test" >&2
        exit 2
        ;;
esac
