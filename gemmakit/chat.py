"""Chat format: Gemma's turn template as token ids plus a loss mask, and the stop tokens.

Where it sits: messages -> `render` -> (tokens, loss_mask) -> `train` (SFT) or `infer` (prompt);
it uses only `tokenizer`. `render_text` gives the same conversation as template text, for display
and for comparison with HF's chat templates (reference §4.4):

    <bos><start_of_turn>user\\n{content}<end_of_turn>\\n<start_of_turn>model\\n{content}<end_of_turn>\\n
    ... and, with add_generation_prompt, a final "<start_of_turn>model\\n".

Rules, as in HF's templates: roles alternate user/assistant starting with user; "assistant" renders
as "model" (the name "model" is accepted too); content is `.strip()`ped (Jinja `trim`). A leading
system message is folded into the first user turn as `system_text + "\\n\\n"`, system text not
trimmed: exactly HF's Gemma 3 template. The Gemma 1/2 template instead raises "System role not
supported"; we fold there too by default (as llama.cpp's built-in Gemma template does, though it
also trims the system text), and `system="error"` restores the rejection. Deviations from HF, all
on inputs HF renders strangely: a system message with no user turn after it is an error (HF drops
it silently), other roles are errors (HF renders "<start_of_turn>system" for a system message at
an odd position), and content must be a string (no image items: this package is text-only).

Loss mask: 1 exactly on the tokens the model must produce: the content of each model turn and its
<end_of_turn>, which is how the model learns to stop (the stop token of reference §4.5). The "\\n"
after <end_of_turn> is 0: generation stops at <end_of_turn>, so the model never emits it. BOS, turn
headers, the "model\\n" header and user turns are 0.

Key trade-off: ids are concatenated piece by piece (<bos>, <start_of_turn>, encode("user\\n"),
encode(content), <end_of_turn>, encode("\\n")) instead of tokenizing rendered text with special-token
parsing as HF's apply_chat_template does. User content can never contain a turn marker (HF parses
"<end_of_turn>" inside content as the marker), and the mask is exact per token. Header and content
are tokenized separately; that equals tokenizing the whole text when "\\n" is an atomic
(user-defined) piece that SentencePiece always cuts out on its own, as in Gemma's files (id 108 in
the 256k file) and in the test models, and model content is then tokenized exactly as the model
sees its own output after "model\\n". Tests compare the ids with HF's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gemmakit.errors import UserError
from gemmakit.tokenizer import LAYOUT_TURN_IDS, Tokenizer

SYSTEM_POLICIES = ("fold", "error")
_ROLE_NAMES = {"user": "user", "assistant": "model", "model": "model"}  # message role -> rendered


class ChatError(UserError):
    """A conversation cannot be rendered; the message names the message index and the problem."""


@dataclass(frozen=True)
class Rendered:
    """Token ids of a conversation and a same-length 0/1 mask of the tokens to train on."""

    tokens: list[int]
    loss_mask: list[int]


@dataclass(frozen=True)
class _Turn:
    role: str  # as rendered: "user" or "model"
    body: str  # text between the "{role}\n" header and <end_of_turn>
    ids: tuple[int, ...] | None = None  # the body's token ids as generated, used instead of encode(body)


def _field(message: Any, index: int, key: str) -> str:
    if not isinstance(message, Mapping) or key not in message:
        raise ChatError(f"message {index}: expected a mapping with 'role' and 'content'")
    value = message[key]
    if not isinstance(value, str):
        raise ChatError(f"message {index}: {key} must be a string, got {type(value).__name__}")
    return value


def _turns(messages: Sequence[Mapping[str, Any]], system: str) -> list[_Turn]:
    """Validate a conversation and reduce it to rendered turns (shared by render/render_text)."""
    if system not in SYSTEM_POLICIES:
        raise ChatError(f"system must be one of {SYSTEM_POLICIES}, got {system!r}")
    if not messages:
        raise ChatError("no messages: a conversation needs at least one user message")
    prefix, start = "", 0
    if _field(messages[0], 0, "role") == "system":
        if system == "error":
            raise ChatError("message 0: system role not supported (system='error'); use 'fold'")
        if len(messages) == 1:
            raise ChatError("message 0: a system message must be followed by a user message")
        prefix, start = _field(messages[0], 0, "content") + "\n\n", 1
    turns = []
    for i in range(start, len(messages)):
        role = _field(messages[i], i, "role")
        want = "user" if (i - start) % 2 == 0 else "model"
        if _ROLE_NAMES.get(role) != want:
            expected = "user" if want == "user" else "assistant"
            raise ChatError(
                f"message {i}: role {role!r} where {expected!r} was expected; roles must alternate "
                "user/assistant, starting with user (after an optional first system message)"
            )
        body = _field(messages[i], i, "content").strip()
        turns.append(_Turn(want, prefix + body if i == start else body))
    return turns


def render(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    system: str = "fold",
) -> Rendered:
    """Token ids and loss mask of `messages` ({"role", "content"} mappings) in Gemma's format."""
    return _render_turns(tokenizer, _turns(messages, system), add_generation_prompt)


def _render_turns(tokenizer: Tokenizer, turns: Sequence[_Turn], add_generation_prompt: bool) -> Rendered:
    """Ids and mask of validated turns; a turn's `ids`, when set, stand for its encoded body."""
    sot, eot = tokenizer.start_of_turn_id, tokenizer.end_of_turn_id
    newline = tokenizer.encode("\n", bos=False)
    headers = {role: [sot, *tokenizer.encode(role + "\n", bos=False)] for role in ("user", "model")}
    tokens, mask = [tokenizer.bos_id], [0]
    for turn in turns:
        body = [*(tokenizer.encode(turn.body, bos=False) if turn.ids is None else turn.ids), eot]
        tokens += headers[turn.role] + body + newline
        mask += [0] * len(headers[turn.role]) + [int(turn.role == "model")] * len(body)
        mask += [0] * len(newline)
    if add_generation_prompt:
        tokens += headers["model"]
        mask += [0] * len(headers["model"])
    return Rendered(tokens, mask)


def render_text(
    messages: Sequence[Mapping[str, Any]],
    generation_layout: str,
    add_generation_prompt: bool = True,
    system: str = "fold",
) -> str:
    """The template text of `messages`, special tokens as literal strings ("<bos>", ...).

    For display and comparison only: feed models the ids from `render`, since tokenizing this text
    with special-token parsing would let content forge turn markers. The text is the same for both
    layouts (they differ in ids only); `generation_layout` is checked so callers state which.
    """
    if generation_layout not in LAYOUT_TURN_IDS:
        raise ChatError(f"unknown generation layout {generation_layout!r}; expected one of "
                        f"{tuple(LAYOUT_TURN_IDS)}")  # fmt: skip
    parts = ["<bos>"]
    for turn in _turns(messages, system):
        parts.append(f"<start_of_turn>{turn.role}\n{turn.body}<end_of_turn>\n")
    if add_generation_prompt:
        parts.append("<start_of_turn>model\n")
    return "".join(parts)


def stop_tokens(tokenizer: Tokenizer) -> list[int]:
    """Ids that end a model reply: <eos> and <end_of_turn> (reference §4.5)."""
    return list(tokenizer.stop_ids)


class Conversation:
    """A growing chat for an interactive loop (the CLI): add turns, render the next prompt.

    Checks role order as turns are added, so a bad sequence fails at the call that causes it.
    A system prompt is folded into the first user turn (see the module docstring). A model turn
    can carry the token ids the model generated; the next prompt then holds exactly those ids, so
    the model is conditioned on what it really produced. Re-encoding the decoded text can give other
    ids: SentencePiece need not segment a text the way sampling built it ("ab" sampled as "a" + "b"
    encodes as "ab"), and the content is stripped before encoding.
    """

    def __init__(self, tokenizer: Tokenizer, system_prompt: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self._turns: list[dict[str, str]] = []
        self._ids: list[tuple[int, ...] | None] = []  # per turn: the model's own ids, None for text

    @property
    def messages(self) -> list[dict[str, str]]:
        """A copy of the conversation as {"role", "content"} dicts, system message first if set."""
        head = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        return head + [dict(m) for m in self._turns]

    def add_user(self, text: str) -> None:
        if self._turns and self._turns[-1]["role"] == "user":
            raise ChatError("a user turn must follow a model turn (or start the conversation)")
        self._turns.append({"role": "user", "content": text})
        self._ids.append(None)

    def add_model(self, text: str, token_ids: Sequence[int] | None = None) -> None:
        """Add the model's reply: its text, and the ids it was decoded from (without the stop token)."""
        if not self._turns or self._turns[-1]["role"] != "user":
            raise ChatError("a model turn must follow a user turn")
        self._turns.append({"role": "assistant", "content": text})
        self._ids.append(None if token_ids is None else tuple(int(t) for t in token_ids))

    def drop_oldest_exchange(self) -> bool:
        """Forget the oldest user turn and the model reply to it; False (nothing dropped) when no
        complete exchange precedes the last turn. The system prompt stays."""
        if len(self._turns) < 2:  # roles alternate, so two turns or more start with a user/model pair
            return False
        del self._turns[:2], self._ids[:2]
        return True

    def pop_user(self) -> str:
        """Remove and return the last turn, which must be a user turn awaiting a reply."""
        if not self._turns or self._turns[-1]["role"] != "user":
            raise ChatError("the conversation does not end with a user turn")
        self._ids.pop()
        return self._turns.pop()["content"]

    def reset(self) -> None:
        """Forget all turns; the system prompt stays."""
        self._turns.clear()
        self._ids.clear()

    def prompt_tokens(self) -> list[int]:
        """Ids to prefill before generating the next model reply (ends with "<start_of_turn>model\\n")."""
        if not self._turns or self._turns[-1]["role"] != "user":
            raise ChatError("the conversation must end with a user turn before asking for a reply")
        turns = _turns(self.messages, "fold")  # one per entry of self._turns, system folded into the first
        turns = [
            t if ids is None else _Turn(t.role, t.body, ids) for t, ids in zip(turns, self._ids, strict=True)
        ]
        return _render_turns(self.tokenizer, turns, add_generation_prompt=True).tokens
