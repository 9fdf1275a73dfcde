# podtap — every install step of the project lives here (and in scripts/).
PY      := /usr/bin/python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: install deps venv demo test lint typecheck unit kernel bench bench-deps bench-smoke clean image manifests

install: deps venv

deps:
	bash scripts/install-deps.sh

$(STAMP): pyproject.toml
	$(PY) -m venv --system-site-packages $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[dev]'
	$(VPY) -c 'import bcc' || { echo 'bcc is not importable: run make deps'; exit 1; }
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(VENV)/bin/ruff check agent tests bench scripts simnode
	$(VENV)/bin/mypy

test: install
	$(VENV)/bin/ruff check agent tests bench scripts simnode
	$(VENV)/bin/mypy
	$(VPY) -m pytest -q tests

unit: venv
	$(VPY) -m pytest -q tests/unit

demo: install
	$(VPY) -m simnode.demo

bench-deps:
	bash scripts/install-bench-deps.sh

# The benchmark page (docs/benchmarks.md, docs/bench/): the full run, about 55 min, root; not in CI.
bench: install bench-deps
	$(VPY) bench/page.py

# Every benchmark shortened (< 3 min) into a temp dir; fails if one breaks. Run in CI.
bench-smoke: install bench-deps
	$(VPY) bench/page.py --smoke

image: install
	bash scripts/image.sh

manifests: venv
	$(VPY) scripts/render-manifests.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
