# Two commands a new user needs: `make dashboard` and `make test`. Both create .venv and install on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install dashboard test lint split data data-test shipped-model clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

dashboard: $(STAMP)
	$(BIN)/streamlit run dashboard/app.py $(if $(RUN),-- --run $(RUN))

# Two workers (pytest-xdist) on whole modules; TEST_WORKERS=0 runs the suite in this one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

# Optional: the HAM10000 images (and the ISIC 2018 test set) from their public record, verified and resumable.
data: $(STAMP)
	$(BIN)/python train.py download ham10000

data-test: $(STAMP)
	$(BIN)/python train.py download isic2018-test

# ruff (style, imports, bugbear, pyupgrade; pyproject.toml) over the project, mypy over core.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# Rebuild the shipped model from configs/shipped into runs/shipped (hours on a CPU; DEVICE=cuda on a GPU).
shipped-model: $(STAMP)
	$(BIN)/python train.py shipped --out runs/shipped $(if $(DEVICE),--device $(DEVICE))

split: $(STAMP)
	$(BIN)/python train.py split --folds 5

clean:
	rm -rf $(VENV) .pytest_cache
