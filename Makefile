# Two commands: `make demo` and `make test`. Everything else is what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR := data/demo
CLI := $(BIN)/cancel-risk
RELIABILITY_DIR := reports/reliability
MLSERVER_VENV := .venv-mlserver
MLSERVER_STAMP := $(MLSERVER_VENV)/.installed
BENCH_DIR := reports/bench

.PHONY: demo test lint format venv browser postgres clean reliability audit bench-rest

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,spark]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(CLI) simulate --out $(DEMO_DIR)/history --days 120 --orders-per-day 150 --seed 7 --truth
	$(CLI) inspect --history $(DEMO_DIR)/history
	$(CLI) train --history $(DEMO_DIR)/history --promote-if-better
	$(CLI) score --history $(DEMO_DIR)/history --out $(DEMO_DIR)/scores.parquet
	$(CLI) show --scores $(DEMO_DIR)/scores.parquet --top 5
	$(CLI) report --history $(DEMO_DIR)/history --out $(DEMO_DIR)/report.html
	$(BIN)/python -m cancel_risk.examples --history $(DEMO_DIR)/history --out $(DEMO_DIR)/request.json
	$(BIN)/python -m cancel_risk.live_demo --history $(DEMO_DIR)/history --db $(DEMO_DIR)/book.db
	@echo
	@echo "Cause report: $(DEMO_DIR)/report.html"
	@echo "Scores:       $(DEMO_DIR)/scores.parquet (summary and rejects beside it)"
	@echo
	@echo "Start the scoring service (it loads models:/cancel-risk@champion):"
	@echo "  CANCEL_RISK_API_KEYS=demo-key $(CLI) serve"
	@echo "then, from another terminal, score an open order:"
	@echo "  curl -s -X POST http://127.0.0.1:8000/v1/score -H 'X-API-Key: demo-key' -H 'Content-Type: application/json' --data @$(DEMO_DIR)/request.json"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# The report's and the dashboard's tests open the pages in a real headless browser: Debian's
# chromium, with a font for the Chinese pages (WenQuanYi Micro Hei).
browser:
	@{ command -v chromium >/dev/null 2>&1 && [ -e /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ]; } || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-microhei >/dev/null; \
	  else \
	    echo "chromium or its Chinese font is missing: run 'sudo apt-get install chromium fonts-wqy-microhei'"; exit 1; \
	  fi; }

# The order book's tests start a real PostgreSQL server of their own: Debian's postgresql.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else \
	    echo "postgresql is missing: run 'sudo apt-get install postgresql'"; exit 1; \
	  fi; }

test: lint browser postgres
	$(BIN)/python -m pytest

# The long runs behind the README's Reliability section (about ten minutes): at least 1,000
# requests generated from the OpenAPI document, a five-minute soak at concurrency 32 (each
# against its own `cancel-risk serve` on 127.0.0.1 with a freshly trained model), and the
# dependency audit. Results: $(RELIABILITY_DIR)/*.json and *.md. `make test` runs short versions.
reliability: $(STAMP)
	mkdir -p $(RELIABILITY_DIR)
	$(BIN)/python -m benchmarks.fuzz --min-requests 1000 \
	  --out-json $(RELIABILITY_DIR)/fuzz.json --out-markdown $(RELIABILITY_DIR)/fuzz.md
	$(BIN)/python -m benchmarks.soak --duration 300 --concurrency 32 \
	  --out-json $(RELIABILITY_DIR)/soak.json --out-markdown $(RELIABILITY_DIR)/soak.md
	$(BIN)/python -m benchmarks.dependency_audit --out-json $(RELIABILITY_DIR)/pip-audit.json

# MLServer's LightGBM runtime, the REST benchmark's third server, in its own environment (its
# pins conflict with the project's): the two packages of benchmarks/mlserver-requirements.txt,
# everything else held by benchmarks/mlserver-constraints.txt.
$(MLSERVER_STAMP): benchmarks/mlserver-requirements.txt benchmarks/mlserver-constraints.txt
	$(PYTHON) -m venv $(MLSERVER_VENV)
	$(MLSERVER_VENV)/bin/python -m pip install --quiet --upgrade "pip>=24"
	$(MLSERVER_VENV)/bin/python -m pip install --quiet -c benchmarks/mlserver-constraints.txt \
	  -r benchmarks/mlserver-requirements.txt
	touch $(MLSERVER_STAMP)

# The REST benchmark behind the README's "REST service" figures (10 to 15 minutes):
# `cancel-risk serve`, `mlflow models serve` and MLServer on the same requests and booster.
bench-rest: $(STAMP) $(MLSERVER_STAMP)
	$(BIN)/python -m benchmarks.rest --mlserver $(MLSERVER_VENV)/bin/mlserver \
	  --out-json $(BENCH_DIR)/rest.json --out-markdown $(BENCH_DIR)/rest.md

# pip-audit of the installed packages (needs PyPI); fails only on a known vulnerability.
audit: $(STAMP)
	mkdir -p $(RELIABILITY_DIR)
	$(BIN)/python -m benchmarks.dependency_audit --out-json $(RELIABILITY_DIR)/pip-audit.json

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(MLSERVER_VENV) $(DEMO_DIR) mlruns mlflow.db .pytest_cache reports
