#!/usr/bin/env bash
# Build llama-server from the llama.cpp sources vendored in the sdist of the installed llama-cpp-python
# (the same llama.cpp as infersnap's llama.cpp engines), into a cache folder outside the repository.
# Skips the build when the binary is there. Progress goes to stderr; stdout is the binary's path only:
#
#   LLAMA_SERVER=$(bench/build_llama_server.sh)
#
# PY: the Python whose llama-cpp-python is meant (default .venv/bin/python);
# LLAMA_SERVER_CACHE: the folder (default ~/.cache/infersnap/llama-server-<version>).
set -euo pipefail

PY=${PY:-.venv/bin/python}
version=$("$PY" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))')
cache=${LLAMA_SERVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/infersnap/llama-server-$version}

# The sdist unpacks to llama_cpp_python-<version>/ (older ones: llama-cpp-python-<version>/).
find_binary() {
    for binary in "$cache"/llama?cpp?python-"$version"/vendor/llama.cpp/build/bin/llama-server; do
        if [ -x "$binary" ]; then echo "$binary"; return 0; fi
    done
    return 1
}

if find_binary; then exit 0; fi

mkdir -p "$cache"
echo "building llama-server from llama-cpp-python $version's llama.cpp in $cache (minutes)" >&2
"$PY" -m pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$version" -d "$cache" >&2
tar -xzf "$(ls "$cache"/llama?cpp?python-"$version".tar.gz | head -1)" -C "$cache"
source=$(ls -d "$cache"/llama?cpp?python-"$version"/vendor/llama.cpp | head -1)
cmake -S "$source" -B "$source/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF >&2
cmake --build "$source/build" --target llama-server -j"$(nproc)" >&2
find_binary || { echo "the build ended without $source/build/bin/llama-server" >&2; exit 1; }
