# Two commands for a fresh machine:  make demo  and  make test.
# Both create .venv first (idempotent: it is rebuilt only when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-output

.PHONY: setup demo test test-fast lint bench clean-demo browser

setup: $(STAMP) browser

# torch first, pinned, so nnunetv2's requirement is met by it. From PyPI on Linux that pin is the CUDA 13 build
# (~2.7 GB with its NVIDIA wheels); TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu takes the 192 MB CPU build.
TORCH_INDEX_URL ?=
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

# The review page's tests drive a real Chromium through Playwright, with the system's browser (Playwright
# downloads none). Debian/Ubuntu: installed with apt-get when missing (CI runs as root; otherwise sudo).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  command -v apt-get >/dev/null 2>&1 || { echo "Install Chromium (the review page's tests drive it)." >&2; exit 1; }; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

# The main job on the bundled default: a phantom patient through `prl-detect detect` with the bundled model.
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(BIN)/prl-detect phantom --out $(DEMO_DIR)/cases --n 1 --seed 2026
	$(BIN)/prl-detect detect --qsm $(DEMO_DIR)/cases/case_000/qsm.nii.gz --out $(DEMO_DIR)/result
	$(BIN)/prl-detect evaluate --gt $(DEMO_DIR)/cases/case_000 --pred $(DEMO_DIR)/result

test: $(STAMP) browser
	$(BIN)/ruff check PRLDetectorLib Testing PRLDetector.py
	$(BIN)/python -m pytest -q

test-fast: $(STAMP) browser
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python Testing/Benchmarks/bench_detect.py
	$(BIN)/python Testing/Benchmarks/bench_features.py

clean-demo:
	rm -rf $(DEMO_DIR)
