# Two commands do all set-up on a fresh machine (see README):
#   make run    the main job (embedded default config, real Ray + DeepSpeed run)
#   make test   the test suite
# Both create or reuse .venv first (scripts/setup.sh).

PY := .venv/bin/python

.PHONY: setup run test mi-check clean

setup:
	@bash scripts/setup.sh

run: setup
	$(PY) -m mi_scale.cli train

mi-check: setup
	$(PY) -m mi_scale.cli mi-check

test: setup
	bash scripts/test.sh

clean:
	rm -rf .venv runs report .pytest_cache
