#!/bin/bash
# Run here, from the repo root, before bench/gpu/check.sh: fills the ignored folder .dev with what the
# GPU machine cannot fetch (it reaches no registry) and that fits the device tool's 64 MiB carry:
# llama-cpp-python's sdist without its docs and sample models, the cp312 wheels infersnap needs beyond
# the machine's own packages, and a 4-layer cut of the default model (its full 98 MB would not fit).
set -euo pipefail
VERSION=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))")
mkdir -p .git/info .dev/whl
grep -qx "/.dev/" .git/info/exclude 2>/dev/null || echo "/.dev/" >> .git/info/exclude
work=$(mktemp -d)
python3 -m pip download -q --no-deps --no-binary=:all: -d "$work" "llama-cpp-python==$VERSION"
tar xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
(cd "$work" && tar czf - --exclude='*/.git' --exclude='*/vendor/llama.cpp/models' --exclude='*/vendor/llama.cpp/docs' \
  --exclude='*/vendor/llama.cpp/benches' --exclude='*/tools/ui' --exclude='*/ggml-sycl' --exclude='*/ggml-hexagon' \
  --exclude='*/ggml-opencl' --exclude='*/ggml-et' "llama_cpp_python-$VERSION") > .dev/lcp.tar.gz
# what infersnap needs that the machine's image lacks (it has numpy, jinja2, click, pyyaml, httpx, uvloop, ...)
for name in sanic sanic-routing tracerite html5tagger websockets httptools ujson msgspec pyzmq diskcache; do
  spec="$name==$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$name'))")"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_26_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .dev/whl "$spec"
done
python3 -m pip install -q --target "$work/gguf" gguf
model=$(.venv/bin/python -c "from infersnap.models import default_model_path as d; print(d())")
PYTHONPATH="$work/gguf" .venv/bin/python bench/gpu/truncate_gguf.py "$model" "$work/small.gguf" 4
.venv/bin/python - "$work/small.gguf" .dev/small.gguf <<'PY'
import ctypes, sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.token_embedding_type = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, llama_cpp.GGML_TYPE_Q4_0
params.allow_requantize = True
assert llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)) == 0
PY
rm -rf "$work"
du -sh .dev
