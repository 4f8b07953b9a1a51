# Two commands on a fresh machine: `make demo` and `make test`. Both create the venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test viewer browser clean-runs

$(STAMP): requirements.txt python_env.yaml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pipeline.tracking.project_env
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pipeline experiment --config conf/demo.yaml

test: $(STAMP) browser
	$(PY) -m pytest -q tests

# the viewer tests drive Debian's Chromium (Playwright cannot download its own browser offline)
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q chromium; }

viewer: $(STAMP)
	$(VENV)/bin/streamlit run viewer/app.py --server.address 127.0.0.1

clean-runs:
	rm -rf mlflow.db mlruns
