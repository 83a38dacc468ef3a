# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: setup run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned: this version installs a CPU build from a local file on our machines;
	# any other version would pull gigabytes of CUDA wheels.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[all,dev]'  # [all]: every extra (tinychat/extras.py); dev: the test tools
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/tinychat speedrun

# Two pytest-xdist workers, each with its share of torch's threads (tests/conftest.py): much of the suite waits on
# subprocesses, servers and compilers, so two workers fill a 2-core machine. `make test TEST_WORKERS=0` runs serially.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist worksteal

lint: $(STAMP)
	$(VENV)/bin/ruff check tinychat tests bench
	$(VENV)/bin/ruff format --check tinychat tests bench

bench: $(STAMP)
	$(PY) bench/generate.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
