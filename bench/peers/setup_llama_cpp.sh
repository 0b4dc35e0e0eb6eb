#!/usr/bin/env bash
# The benchmark-only environment for llama.cpp as a CPU peer engine: bench/.venv-llama (git-ignored). None of this
# is a project dependency; a benchmark imports llama_cpp from this venv's python only.
#
#   llama-cpp-python 0.3.36   built from source (no wheel), so the vendored llama.cpp is compiled for this machine.
#                             The x86 instruction sets are chosen from the /proc/cpuinfo flags at run time, each one
#                             switched ON or OFF explicitly, so a build never uses an instruction the CPU lacks:
#                               always      GGML_NATIVE=OFF, GGML_AMX_TILE/INT8/BF16=OFF (these machines report AMX but
#                                           fault on it)
#                               sse4_2 avx bmi2                    GGML_SSE42 / GGML_AVX / GGML_BMI2 (ggml turns them
#                                                                  on by default once GGML_NATIVE is OFF)
#                               avx2 fma f16c                      GGML_AVX2 / GGML_FMA / GGML_F16C
#                               avx512f (+ avx512_vbmi, avx512_vnni, avx512_bf16)
#                                                                  GGML_AVX512 (+ _VBMI, _VNNI, _BF16)
#                             The chosen CMAKE_ARGS are written to bench/.venv-llama/BUILD_FLAGS (one line) so a
#                             benchmark can report which build ran. cmake and ninja come from PyPI into the venv when
#                             the system has none. The build takes 10-20 minutes on 2 cores.
#
# Usage: bash bench/peers/setup_llama_cpp.sh  (PYTHON=python3.11 by default; a rerun with llama_cpp importable and
#                                              the same BUILD_FLAGS skips the build)
set -euo pipefail

bench_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$bench_dir/.venv-llama"
python=${PYTHON:-python3.11}
version=0.3.36

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/pip" install --quiet --disable-pip-version-check)
export PATH="$venv/bin:$PATH"

# The CPU's flags (the first processor's line; all cores of these machines report the same).
cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2-) "
has() { [[ "$cpu_flags" == *" $1 "* ]]; }
onoff() { if has "$1"; then echo ON; else echo OFF; fi; }

cmake_args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
cmake_args+=" -DGGML_SSE42=$(onoff sse4_2) -DGGML_AVX=$(onoff avx) -DGGML_BMI2=$(onoff bmi2)"
cmake_args+=" -DGGML_AVX2=$(onoff avx2) -DGGML_FMA=$(onoff fma) -DGGML_F16C=$(onoff f16c)"
if has avx512f; then
    cmake_args+=" -DGGML_AVX512=ON -DGGML_AVX512_VBMI=$(onoff avx512_vbmi)"
    cmake_args+=" -DGGML_AVX512_VNNI=$(onoff avx512_vnni) -DGGML_AVX512_BF16=$(onoff avx512_bf16)"
else
    cmake_args+=" -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF"
fi
# (LLAMA_CURL is not passed: llama-cpp-python's CMakeLists forces it OFF and llama.cpp has deprecated it.)

installed_ok() {
    "$venv/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$version')" 2>/dev/null
}

if [ -f "$venv/BUILD_FLAGS" ] && [ "$(cat "$venv/BUILD_FLAGS")" = "$cmake_args" ] && installed_ok; then
    echo "llama-cpp-python $version already built with these flags; skipping the build"
else
    command -v cmake >/dev/null || "${pip[@]}" cmake
    command -v ninja >/dev/null || "${pip[@]}" ninja
    rm -f "$venv/BUILD_FLAGS"
    echo "building llama-cpp-python $version from source with CMAKE_ARGS=$cmake_args"
    CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL=2 \
        "${pip[@]}" --force-reinstall --no-binary llama-cpp-python --no-cache-dir "llama-cpp-python==$version"
    echo "$cmake_args" > "$venv/BUILD_FLAGS"
fi

echo "installed in $venv:"
"$venv/bin/python" -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__)'
echo "BUILD_FLAGS: $(cat "$venv/BUILD_FLAGS")"
