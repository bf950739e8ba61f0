# The two entry points the README documents; both install into .venv first if needed.
VENV ?= .venv
STAMP := $(VENV)/.blockdiff-installed
# pytest-xdist workers: test files run in parallel, one engine core each (tests/conftest.py).
TEST_WORKERS ?= 2

.PHONY: demo test lint

$(STAMP): scripts/setup_cpu.sh scripts/cpu_requirements.py pyproject.toml
	bash scripts/setup_cpu.sh
	touch $@

demo: $(STAMP)
	$(VENV)/bin/python examples/demo.py

test: $(STAMP)
	$(VENV)/bin/ruff check vllm_blockdiff plugins patches tests benchmarks examples scripts
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

lint: $(STAMP)
	$(VENV)/bin/ruff check vllm_blockdiff plugins patches tests benchmarks examples scripts
