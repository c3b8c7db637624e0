# qpp's two entry points; both create or reuse the virtual environment in .venv/.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.qpp-installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: venv test quantize lint

venv: $(STAMP)

# torch and torchvision are pinned and installed first, on their own, so pip never picks a
# build that breaks torchvision (see README).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.qpp-installed-*
	touch $@

test: venv
	$(VENV)/bin/pytest -q -p no:cacheprovider

quantize: venv
	$(VENV)/bin/qpp quantize minilm

lint: venv
	$(VENV)/bin/ruff check qpp tests bench
	$(VENV)/bin/ruff format --check qpp tests bench
