# Two commands for a fresh machine:  make run  (set-up + demo data + dvc repro)  and  make test.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DATASETS := imdb agedb fgnet adience utkface

.PHONY: setup run demo-data test clean-outputs image image-test

# Every DVC stage is a new Python process: with PYTHONDONTWRITEBYTECODE set (some machines set
# it) each one would recompile the ~2,000 modules torch, torchvision and MLflow import, 17 s a
# stage instead of 5. The first stage writes the bytecode into .venv; the rest reuse it. This is
# cheaper than compiling all of .venv ahead (compileall: 48 s on 2 cores).
unexport PYTHONDONTWRITEBYTECODE

# Re-install only when the project's dependencies change.
$(STAMP): pyproject.toml $(wildcard requirements/*.txt)
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "agecascade needs Python 3.11 (set PYTHON=...)"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# auto-sklearn's own Python 3.9 venv (stdlib-only builder; it says why when it cannot) builds
	@# beside the main install. pip does not compile bytecode (on one core, for every module):
	@# the processes that import a module write its bytecode, see unexport above.
	PYTHONPATH=src $(PYTHON) -m agecascade.features.automl_env > $(VENV)/automl-env.log 2>&1 & automl=$$!; \
	$(BIN)/python -m pip install --disable-pip-version-check --no-compile -q -e '.[faces,onnx,dev]' && \
	$(BIN)/python -m pip install --disable-pip-version-check --no-compile -q --no-deps -r requirements/no-deps.txt; pip=$$?; \
	wait $$automl; automl=$$?; cat $(VENV)/automl-env.log; test $$pip = 0 && test $$automl = 0
	touch $(STAMP)

setup: $(STAMP)

# Demo datasets only when data/ holds none of the five: real data is never overwritten. The demo
# writer is deterministic: `dvc commit data.dvc` refuses (without --force) when what it wrote
# differs from the committed data.dvc, and otherwise caches it, so `dvc status` ends clean.
# Writing them takes one core; meanwhile the other writes the bytecode of what the training
# stages import (torch, torchvision, MLflow's SQL store), which the first stage would otherwise
# compile itself (15 s).
demo-data: setup
	@$(BIN)/python -c 'import agecascade.pipelines.lopo, mlflow.store.tracking.sqlalchemy_store' & warm=$$!; \
	found=0; for d in $(DATASETS); do [ -e data/$$d ] && found=1; done; \
	if [ $$found = 0 ]; then \
	  echo "data/ holds no dataset: writing synthetic demo datasets"; \
	  $(BIN)/agecascade demo-data --out data || exit 1; \
	  $(BIN)/dvc commit -q data.dvc < /dev/null || { echo "the demo data differs from data.dvc"; exit 1; }; \
	else echo "data/ already holds datasets: using them"; fi; \
	wait $$warm

run: demo-data
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@echo
	@echo "Results:"
	@for d in prepared/*/; do echo "  $$d  (manifest.parquet, crops.npy, report.json)"; done
	@echo "  checkpoints:  models/<backbone>/{tune,imdb,agedb}/  (model.pt, metrics.json, history.csv)"
	@echo "  protocols:    models/<backbone>/fgnet_{a,b,c}/ (FG-NET LOPO), models/<backbone>/adience/"
	@echo "  report:       reports/summary.md (thesis tables 4-6), reports/cam/, reports/registry.json"
	@echo "  champion:     mlflow.pyfunc.load_model('models:/age-estimator@champion')  (see README)"
	@echo "  metrics:      $(BIN)/dvc metrics show        curves: $(BIN)/dvc plots show"
	@echo "  MLflow UI:    $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000"

test: setup
	$(BIN)/python -m pytest

# The Dockerfile's two targets (pipeline, serve) with docker, else podman; see docker/image.sh for
# ENGINE, IMAGE, BASE, WHEELS and CA_BUNDLE.
image:
	bash docker/image.sh build

# Build, then inside the images: the fast tests, dvc repro on demo data, the served model.
image-test:
	bash docker/image.sh test

clean-outputs:
	rm -rf prepared
