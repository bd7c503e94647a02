.PHONY: setup demo test

setup:
	bash scripts/setup.sh

# The main job on the embedded model: extract a persona vector (judge none; resumes if interrupted), then answer
# one question without and with steering.
DEMO_TRAIT ?= optimistic
DEMO_PROMPT ?= My business had its worst month ever. What do you make of that?
demo: setup
	.venv/bin/personascope info
	.venv/bin/personascope extract $(DEMO_TRAIT) --out runs/$(DEMO_TRAIT)
	.venv/bin/personascope generate "$(DEMO_PROMPT)" --max-new-tokens 60
	.venv/bin/personascope generate "$(DEMO_PROMPT)" --max-new-tokens 60 --vector runs/$(DEMO_TRAIT)/vector.safetensors

# The whole test suite.
test: setup
	.venv/bin/python -m pytest -q
