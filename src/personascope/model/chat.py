"""Chat encoding: token ids in the model's chat format, prompt/response boundary found by concatenating ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# A plain chat layout for tokenizers that ship no chat template (base models, GPT-2).
_FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)



@dataclass
class ChatEncoding:
    """Token ids of a chat: `ids[:prompt_len]` is the prompt (with the assistant header), the rest the response."""

    ids: list[int]
    prompt_len: int

    @property
    def response_len(self) -> int:
        return len(self.ids) - self.prompt_len


def chat_ids(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """Apply the tokenizer's chat template; fold a system prompt into the first user turn where the template
    rejects system messages (Gemma); use a plain `Role: text` layout where there is no template."""
    template = None if getattr(tokenizer, "chat_template", None) else _FALLBACK_CHAT_TEMPLATE
    try:
        out = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, chat_template=template
        )
    except Exception as exc:  # jinja raises TemplateError for templates without a system role
        if not messages or messages[0]["role"] != "system" or "system" not in str(exc).lower():
            raise
        system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
        if rest and rest[0]["role"] == "user":
            rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
        else:
            rest.insert(0, {"role": "user", "content": system})
        return chat_ids(tokenizer, rest, add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return [int(t) for t in out]
