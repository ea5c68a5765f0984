# The two commands a newcomer needs: `make train` (set up, then the main job) and `make test`.
.PHONY: setup train test lint bench-codec

setup:
	bash scripts/setup.sh

train: setup
	.venv/bin/treepo up --config configs/cpu-smollm2.yaml

test: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider

lint: setup
	.venv/bin/ruff check .

bench-codec: setup
	.venv/bin/python bench/codec.py
