.PHONY: setup demo test lint bench

setup:
	scripts/setup demo

# The main job on the embedded default (local repository, SQLite catalog), from a fresh machine.
demo:
	scripts/setup demo
	scripts/demo

# Everything the tests need, then lint and the whole test suite.
test:
	scripts/setup test
	uv run --frozen ruff check .
	uv run --frozen pytest -q -rs

lint:
	uv run --frozen ruff check .
	uv run --frozen ruff format --check .

bench:
	scripts/setup test
	uv run --frozen python bench/run.py
