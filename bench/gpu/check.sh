#!/bin/bash
# The nvidia-gpu engine, for real, in one run on a lent GPU machine (the device tool; see bench/gpu/README.md):
# build llama-cpp-python with CUDA there, install infersnap offline, serve a small model on the nvidia-gpu
# engine, exercise the API, and bench it against a CPU engine on the same machine. Results land in $OUT.
# Run from the repo root after bench/gpu/prepare.sh, carrying .dev: bash bench/gpu/check.sh
export PYTHONUNBUFFERED=1
REPO=$PWD
R=$OUT/results.txt
say() { echo "== $*" | tee -a $R; }
say "start $(date +%T)"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee -a $R
python3 --version | tee -a $R

mkdir -p /tmp/b && tar xzf .dev/lcp.tar.gz -C /tmp/b
cd /tmp/b/llama_cpp_python-*
# sm_90: the lent H100/H200. FlashAttention kernels stay in: a build without them (-DGGML_CUDA_FA=off)
# had both generating workers die with SIGSEGV at load, possibly from llama.cpp's flash-attention probe.
export CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-90} -DGGML_CUDA_NCCL=off -DLLAVA_BUILD=off -DLLAMA_BUILD_TESTS=off -DLLAMA_BUILD_EXAMPLES=off -DLLAMA_BUILD_TOOLS=off -DLLAMA_BUILD_SERVER=off"
export CMAKE_BUILD_PARALLEL_LEVEL=16
say "build $(date +%T)"
if ls /tmp/wheels/llama_cpp*.whl >/dev/null 2>&1; then say "wheel kept from the last run"
elif ! python3 -m pip wheel --no-deps --no-build-isolation -w /tmp/wheels . > $OUT/build.log 2>&1; then
  tail -40 $OUT/build.log; say "BUILD FAILED"; exit 1
fi
say "built $(date +%T)"
cd $REPO
rm -rf /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-build-isolation --target /tmp/site /tmp/wheels/*.whl .dev/whl/*.whl . >> $R 2>&1
ls /tmp/site/bin | tee -a $R
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
ls /tmp/site/llama_cpp/lib | tee -a $R

cd /tmp  # not the repo root: its infersnap/ folder would shadow the installed package for python -m
export INFERSNAP_DATA=/tmp/isd
infersnap engines | tee -a $R
infersnap set model.path=$REPO/.dev/small.gguf http.port=8328 engines=nvidia-gpu verbose=true >> $R 2>&1

serve() {  # serve, wait until ready
  infersnap serve > $OUT/serve-$1.log 2>&1 &
  for i in $(seq 1 120); do grep -q "infersnap is serving" $OUT/serve-$1.log && return 0; sleep 0.5; done
  say "serve $1 did not get ready"; tail -30 $OUT/serve-$1.log; return 1
}
stop() { pkill -INT -f "infersnap serve"; sleep 3; }

api() { curl -s -m 60 http://127.0.0.1:8328$1 -d "$2"; echo; }
say "serve gpu $(date +%T)"
if serve gpu; then
  infersnap status | tee -a $R
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv | tee -a $R
  say "chat"; api /v1/chat/completions '{"messages":[{"role":"user","content":"Hi"}],"max_tokens":16}' | tee -a $R
  say "stream"; api /v1/chat/completions '{"messages":[{"role":"user","content":"Hi"}],"max_tokens":8,"stream":true,"stream_options":{"include_usage":true}}' | tail -3 | tee -a $R
  say "n=3 seed"; api /v1/completions '{"prompt":"The sea","n":3,"max_tokens":8,"seed":1}' | tee -a $R
  say "json_schema"; api /v1/chat/completions '{"messages":[{"role":"user","content":"Give a person"}],"max_tokens":64,"response_format":{"type":"json_schema","json_schema":{"name":"p","schema":{"type":"object","properties":{"name":{"type":"string"},"age":{"type":"integer"}},"required":["name","age"]}}}}' | tee -a $R
  say "logprobs"; api /v1/chat/completions '{"messages":[{"role":"user","content":"Hi"}],"max_tokens":3,"logprobs":true,"top_logprobs":2}' | head -c 600 | tee -a $R; echo >> $R
  say "embeddings"; api /v1/embeddings '{"input":["a","b"]}' | head -c 200 | tee -a $R; echo >> $R
  say "tokenize"; api /tokenize '{"content":"Hello world"}' | tee -a $R
  say "bench gpu $(date +%T)"
  infersnap bench --concurrency 1,8,32 --requests 32 --max-tokens 128 --json > $OUT/bench-gpu.json 2>>$R
  python3 -c "import json; d=json.load(open('$OUT/bench-gpu.json')); [print(l['concurrency'], round(l['output_tokens_per_s'],1), l['ttft_ms']['p50'], l['errors']) for l in d['levels']]" 2>&1 | tee -a $R
  stop
fi
infersnap set engines=cpu-avx2 >> $R 2>&1
say "serve cpu $(date +%T)"
if serve cpu; then
  infersnap bench --concurrency 1,8,32 --requests 32 --max-tokens 128 --json > $OUT/bench-cpu.json 2>>$R
  python3 -c "import json; d=json.load(open('$OUT/bench-cpu.json')); [print(l['concurrency'], round(l['output_tokens_per_s'],1), l['ttft_ms']['p50'], l['errors']) for l in d['levels']]" 2>&1 | tee -a $R
  stop
fi
say "end $(date +%T)"
