"""Conversations: a row's messages -> the text a chat model reads, and the
characters of it the loss counts.

    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
      -- the model's chat template -->
    "<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n"
                                                       ^^^^^^^^^^^^^^^^ counted (train_on)

Which characters an assistant turn is, is found by rendering prefixes of the
conversation: the turns before it with the generation prompt end where its
content begins, and the turns up to it end after its end-of-turn token
(whitespace after that is left out). That needs no `{% generation %}` markers
in the template (most have none), and holds for every template that renders
the prefixes of a conversation as prefixes of its text (ChatML, Llama 3,
Mistral, Qwen2, ...); a conversation where one does not is refused.

Rows are read as `{role, content}` (system, user, assistant) or as ShareGPT's
`{from, value}` (system, human, gpt); prompt/response pairs become a user turn
and an assistant turn (`pair_messages`).
"""

from __future__ import annotations

from typing import Any, Literal

ROLES = ("system", "user", "assistant")
# ShareGPT's `from` -> role
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}

TrainOn = Literal["assistant", "last", "all"]


def messages_of(value: Any) -> list[dict[str, str]]:
    """A row's conversation as `[{role, content}]`, from `{role, content}` or
    ShareGPT `{from, value}` entries; a ValueError saying what is wrong."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a list of messages, found {_shown(value)}")
    messages = []
    for i, entry in enumerate(value, 1):
        if not isinstance(entry, dict):
            raise ValueError(f"message {i} is {_shown(entry)}, not an object with role and "
                             "content")
        if entry.get("role") is not None:
            role, content = entry.get("role"), entry.get("content")
            if role not in ROLES:
                raise ValueError(f"message {i} has role {role!r}; roles: {', '.join(ROLES)}")
        elif entry.get("from") is not None:
            role, content = SHAREGPT_ROLES.get(entry["from"]), entry.get("value")
            if role is None:
                raise ValueError(f"message {i} is from {entry['from']!r}; ShareGPT's are "
                                 f"{', '.join(SHAREGPT_ROLES)}")
        else:
            raise ValueError(f"message {i} has neither role/content nor from/value: "
                             f"{_shown(entry)}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}) has no text content: {_shown(content)}")
        messages.append({"role": role, "content": content})
    return messages


def check_trainable(messages: list[dict[str, str]], train_on: TrainOn) -> None:
    """A ValueError when the conversation has nothing the loss would count."""
    if train_on != "all" and not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant turn to learn")


def pair_messages(prompt: str, response: str, template: str,
                  system_prompt: str | None) -> list[dict[str, str]]:
    """A prompt/response pair as a conversation: an optional system turn, the
    prompt shown through `template` ("{prompt}" replaced) as the user's turn,
    and the response as the assistant's."""
    turns = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return turns + [{"role": "user", "content": template.replace("{prompt}", prompt)},
                    {"role": "assistant", "content": response}]


def answer(messages: list[dict[str, str]]) -> str | None:
    """The conversation's last assistant turn (the answer a label is read from)."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), None)


def render(tokenizer: Any, messages: list[dict[str, str]], template: str | None,
           train_on: TrainOn) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the chat template writes it, and the character spans
    the loss counts (see the module docstring); a ValueError where the template
    fails, or renders a prefix of the conversation otherwise than as a prefix."""
    def text(turns, prompt=False) -> str:
        try:
            return tokenizer.apply_chat_template(turns, chat_template=template, tokenize=False,
                                                 add_generation_prompt=prompt)
        except Exception as e:  # noqa: BLE001 - Jinja and the template's own raise_exception
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"the chat template fails on it ({detail})") from None

    whole = text(messages)
    if train_on == "all":
        return whole, [(0, len(whole))]
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last":
        turns = turns[-1:]
    spans = []
    for k in turns:
        upto = text(messages[:k + 1])
        before = text(messages[:k], prompt=True) if k else _opening(text, upto, messages[0])
        if not (upto.startswith(before) and whole.startswith(upto)):
            raise ValueError(f"the chat template writes the conversation up to message {k + 1} "
                             "otherwise than as the start of the whole; its assistant turns "
                             "cannot be found in the text (give data.chat_template)")
        spans.append((len(before), len(upto.rstrip())))
    return whole, spans


def _opening(text, upto: str, first: dict[str, str]) -> str:
    """The text before a conversation's first turn, when it is the assistant's:
    the template's own start (an empty conversation with the generation
    prompt), or where the turn's content begins in its text (a template
    that cannot render an empty conversation)."""
    try:
        before = text([], prompt=True)
    except ValueError:
        before = None
    if before is not None and upto.startswith(before):
        return before
    content = first["content"].strip()
    at = upto.rfind(content) if content else -1
    if at < 0:
        raise ValueError("the chat template writes the first (assistant) turn so that its "
                         "text cannot be found")
    return upto[:at]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
