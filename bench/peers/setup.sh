#!/usr/bin/env bash
# The benchmark-only environment for the peer routers and a third-party benchmark client: bench/.venv-peers
# (git-ignored, about 1.5 GB). None of this is a project dependency; bench/bench_cluster.py and bench/bench_client.py
# run these programs as separate processes from it.
#
#   smg 1.13.0            the SGLang model gateway (a Rust binary in the wheel), run as `python -m smg launch`
#   sglang-router 0.3.2   its former package; it also installs a `smg` console script (its own older CLI), so it is
#                         installed first and smg's script reinstalled over it
#   vllm-router 0.1.17    vLLM's router (a Rust fork of the SGLang gateway), run as `python -m vllm_router.launch_router`
#   aiperf 0.13.0         NVIDIA's OpenAI-HTTP benchmark client (bench/bench_client.py drives it)
#
# Usage: bash bench/peers/setup.sh            (PYTHON=python3.11 by default; reruns only check the versions)
set -euo pipefail

bench_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$bench_dir/.venv-peers"
python=${PYTHON:-python3.11}

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/pip" install --quiet --disable-pip-version-check)

"${pip[@]}" "sglang-router==0.3.2" "vllm-router==0.1.17"
"${pip[@]}" --force-reinstall --no-deps "smg==1.13.0"
"${pip[@]}" "smg==1.13.0" "aiperf==0.13.0"

echo "installed in $venv:"
"$venv/bin/python" -m smg --version
"$venv/bin/python" -c 'import vllm_router.version as v; print("vllm-router", v.__version__)'
"$venv/bin/python" -c 'import sglang_router.version as v; print("sglang-router", v.__version__)'
echo "aiperf $("$venv/bin/aiperf" --version 2>/dev/null | tail -n 1)"
