.PHONY: setup demo test

setup:
	bash scripts/setup.sh

# The main job on the embedded model: extract a persona vector (judge none; resumes if interrupted), then answer
# one question without and with steering.
DEMO_TRAIT ?= pirate
DEMO_PROMPT ?= What is the best way to spend a Sunday morning?
demo: setup
	.venv/bin/personascope info
	.venv/bin/personascope extract $(DEMO_TRAIT) --out runs/$(DEMO_TRAIT)
	.venv/bin/personascope generate "$(DEMO_PROMPT)" --max-new-tokens 60
	.venv/bin/personascope generate "$(DEMO_PROMPT)" --max-new-tokens 60 --vector runs/$(DEMO_TRAIT)/vector.safetensors

# The whole test suite.
test: setup
	.venv/bin/python -m pytest -q
