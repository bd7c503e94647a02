.PHONY: setup demo test

setup:
	bash scripts/setup.sh

# The main job on the embedded model.
demo: setup
	.venv/bin/personascope info
	.venv/bin/personascope generate "Tell me about your weekend." --max-new-tokens 60

# The whole test suite.
test: setup
	.venv/bin/python -m pytest -q
