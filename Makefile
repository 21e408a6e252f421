.PHONY: setup demo test lint bench

setup:
	scripts/setup demo

# The main job on the embedded default (local repository, SQLite catalog), from a fresh machine.
demo:
	scripts/setup demo
	scripts/demo

# Everything the tests need, then lint and the whole test suite. libvirtd is started for the
# libvirt tests and stopped afterwards; where it cannot run, those tests skip and say why.
test:
	scripts/setup test
	scripts/setup-libvirt || echo "setup-libvirt failed: the libvirt tests will be skipped"
	uv run --frozen ruff check .
	status=0; uv run --frozen pytest -q -rs || status=$$?; scripts/setup-libvirt --stop || true; exit $$status

lint:
	uv run --frozen ruff check .
	uv run --frozen ruff format --check .

bench:
	scripts/setup bench
	uv run --frozen python bench/run.py
