"""Chat-completion clients chosen by a spec string (`openai:MODEL`, `anthropic:MODEL`, `hf:MODEL`)."""

from personascope.llm.clients import (
    LLM,
    LLM_FORMS,
    LLMRequestError,
    Message,
    make_llm,
    split_spec,
)

__all__ = ["LLM", "LLM_FORMS", "LLMRequestError", "Message", "make_llm", "split_spec"]
