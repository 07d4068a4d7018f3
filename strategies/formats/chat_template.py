"""``chat_template``: conversations rendered with a chat template, the assistant's turns as labels
(Axolotl's ``chat_template``, with its keys and defaults).

A record holds a list of messages (``field_messages``, default ``messages``); each message's role and
content are read through ``message_property_mappings`` and its role is normalised by ``roles`` (default:
``human``/``user`` -> ``user``, ``gpt``/``assistant`` -> ``assistant``, ``system``, ``tool``). The
conversation is rendered with the tokenizer's own template (``chat_template: tokenizer_default``), one
of Axolotl's named templates (``chatml``, ``llama3``, ...: its files, copied in ``chat_templates/``),
``tokenizer_default_fallback_<name>`` (the tokenizer's own, else the named one), or ``chat_template:
jinja`` with ``chat_template_jinja`` (the template, or a ``.jinja`` file's path). The content of turns
whose role is in ``roles_to_train`` (default ``[assistant]``), or of every turn with
``train_on_inputs``, is labelled; the EOS token that closes a turn (within 3 tokens, as Axolotl looks
for it) is labelled as ``train_on_eos`` says: ``turn`` (default: after trained turns), ``all``,
``last`` (the last one only) or ``none``.

Where Axolotl finds a turn's tokens by rendering the conversation again with dummy content, we locate
each turn's content in the rendered text and label the tokens that overlap it (character offsets of
the fast tokenizer; a token that joins the template's space to the content's first word is labelled,
as Axolotl's diff labels it): the same tokens for templates that write the content unchanged, and an
error naming the record for a template that does not (instead of silently mislabelled turns).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from mft_plugin.strategy import DataFormat, RecordError, StrategyParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEMPLATE_FOLDER = Path(__file__).parent / "chat_templates"  # Axolotl's named templates (NOTICE.md there)
NAMED_TEMPLATES = {path.stem: path for path in sorted(TEMPLATE_FOLDER.glob("*.jinja"))}
FALLBACK_PREFIX = "tokenizer_default_fallback_"  # Axolotl: the tokenizer's own template, else the named one
CHOICES = ("tokenizer_default", "jinja", *NAMED_TEMPLATES, *(FALLBACK_PREFIX + name for name in NAMED_TEMPLATES))
DEFAULT_ROLES = {"user": ["human", "user"], "assistant": ["gpt", "assistant"], "system": ["system"], "tool": ["tool"]}
EOS_SEARCH = 3  # tokens after a turn's content in which its EOS is looked for (Axolotl's window)


@functools.cache
def _file_text(path: str) -> str:
    """A template file's text, read once per process (``template`` is asked for every record)."""
    return Path(path).read_text(encoding="utf-8")


class ChatTemplateParams(StrategyParams):
    field_messages: str = Field("messages", description="column holding the list of messages")
    message_property_mappings: dict[str, str] = Field(
        default_factory=lambda: {"role": "role", "content": "content"},
        description="message key of each property the template reads (role, content)",
    )
    roles: dict[str, list[str]] | None = Field(None, description="template role -> the role names in the data that mean it")
    roles_to_train: list[str] = Field(default_factory=lambda: ["assistant"], description="roles whose content is labelled")
    train_on_eos: Literal["turn", "all", "last", "none"] = Field("turn", description="which turns' EOS tokens are labelled")
    chat_template: str = Field(
        "tokenizer_default",
        description="the tokenizer's own template, one of Axolotl's named ones (chatml, llama3, ...), "
        "tokenizer_default_fallback_<name>, or jinja: chat_template_jinja",
    )
    chat_template_jinja: str | None = Field(None, description="the template itself, or a .jinja file's path, with chat_template: jinja")
    eot_tokens: list[str] | None = Field(None, description="tokens that end a turn (default: the EOS token); Axolotl's top-level key")
    train_on_eot: Literal["turn", "all", "last", "none"] | None = Field(None, description="which end-of-turn tokens are labelled (default: train_on_eos)")
    field_thinking: str = Field("reasoning_content", description="message key holding the turn's reasoning trace, if any")
    template_thinking_key: str = Field("reasoning_content", description="the name the template reads the reasoning trace by")
    drop_system_message: bool = Field(False, description="drop a conversation's leading system message")

    @model_validator(mode="before")
    @classmethod
    def _older_spelling(cls, data: Any) -> Any:
        """Axolotl's older ``message_field_role``/``message_field_content``: entries of ``message_property_mappings``."""
        if not isinstance(data, dict) or not {"message_field_role", "message_field_content"} & set(data):
            return data
        data, mapping = dict(data), dict(data.get("message_property_mappings") or {})
        for prop in ("role", "content"):
            field = data.pop(f"message_field_{prop}", None)
            if field is not None and mapping.setdefault(prop, field) != field:
                raise ValueError(f"message_field_{prop}: {field!r} and message_property_mappings.{prop}: {mapping[prop]!r} disagree; keep one")
        mapping = {"role": "role", "content": "content", **mapping}
        return {**data, "message_property_mappings": mapping}

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        if value not in CHOICES:
            names = ", ".join(NAMED_TEMPLATES)
            raise ValueError(
                f"{value!r} is not a chat template: use tokenizer_default, jinja (with chat_template_jinja), one of "
                f"Axolotl's named templates ({names}) or {FALLBACK_PREFIX}<name>"
            )
        return value

    @model_validator(mode="after")
    def _jinja_given(self) -> ChatTemplateParams:
        if (self.chat_template == "jinja") != (self.chat_template_jinja is not None):
            raise ValueError("chat_template: jinja and chat_template_jinja go together: give both or neither")
        return self

    @property
    def eot_option(self) -> str:
        """``train_on_eot``, by default ``train_on_eos`` (Axolotl's backward-compatible reading)."""
        return self.train_on_eot or self.train_on_eos


class ChatTemplateFormat(DataFormat):
    name = "chat_template"
    Params = ChatTemplateParams
    column_keys = ("field_messages",)

    def template(self, tokenizer: PreTrainedTokenizerBase) -> str:
        """The jinja template this entry selects, as Axolotl selects it; an error if it asks for the
        tokenizer's own and the tokenizer has none."""
        choice, own = self.params.chat_template, getattr(tokenizer, "chat_template", None)
        if choice == "jinja":
            jinja = self.params.chat_template_jinja
            return _file_text(jinja) if jinja.endswith(".jinja") and Path(jinja).is_file() else jinja
        if choice.startswith(FALLBACK_PREFIX):
            choice = "tokenizer_default" if own else choice.removeprefix(FALLBACK_PREFIX)
        if choice in NAMED_TEMPLATES:
            return _file_text(str(NAMED_TEMPLATES[choice]))
        if not own:
            raise RecordError(
                f"chat_template: tokenizer_default, but the tokenizer {tokenizer.name_or_path!r} has no chat template; "
                f"choose one of Axolotl's named templates (chatml, llama3, ...) or chat_template: jinja with chat_template_jinja"
            )
        return own

    def role_names(self) -> dict[str, str]:
        """Role name in the data -> role name in the template (``roles``, or Axolotl's defaults)."""
        return {source: role for role, sources in (self.params.roles or DEFAULT_ROLES).items() for source in sources}

    def turns(self, record: Mapping[str, Any]) -> list[dict[str, str]]:
        """The record's messages as ``{role, content}`` with template role names; errors name the message."""
        field, mapping = self.params.field_messages, self.params.message_property_mappings
        messages = record.get(field)
        if not isinstance(messages, list):
            state = "missing" if field not in record else f"a {type(messages).__name__}, not a list of messages"
            raise RecordError(f"field {field!r} (field_messages) is {state}")
        if not messages:
            raise RecordError(f"field {field!r} is an empty conversation")
        roles = self.role_names()
        turns = []
        for i, message in enumerate(messages):
            role = message.get(mapping.get("role", "role")) if isinstance(message, dict) else None
            content = message.get(mapping.get("content", "content")) if isinstance(message, dict) else None
            if not isinstance(role, str) or not isinstance(content, str):
                raise RecordError(f"{field}[{i}] needs a string role and content (message_property_mappings), got {message!r:.80}")
            if role not in roles:
                raise RecordError(f"{field}[{i}]: unknown role {role!r}; known: {', '.join(sorted(roles))} (map others with roles:)")
            turn = {"role": roles[role], "content": content}
            if isinstance(thinking := message.get(self.params.field_thinking), str):  # a reasoning trace
                turn[self.params.template_thinking_key] = thinking
            turns.append(turn)
        return turns[1:] if self.params.drop_system_message and turns[0]["role"] == "system" else turns

    def end_of_turn_ids(self, tokenizer: PreTrainedTokenizerBase) -> set[int]:
        """The ids of ``eot_tokens`` (default: the EOS token) that the template writes (Axolotl skips the
        others); an error for one the tokenizer splits, or for the EOS token labelled two ways."""
        eot_tokens, template = self.params.eot_tokens or [tokenizer.eos_token], self.template(tokenizer)
        if tokenizer.eos_token in eot_tokens and self.params.eot_option != self.params.train_on_eos:
            raise RecordError("eot_tokens holds the EOS token, and train_on_eot and train_on_eos disagree; make them equal")
        ids = set()
        for token in [token for token in eot_tokens if token in template] if self.params.eot_tokens else eot_tokens:
            encoded = tokenizer.encode(token, add_special_tokens=False) if token else []
            if len(encoded) != 1:
                raise RecordError(f"eot_tokens: {token!r} is {len(encoded)} tokens of this tokenizer, not one; add it under tokens:")
            ids |= set(encoded)
        return ids

    def tokenize(
        self, record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, train_on_inputs: bool
    ) -> dict[str, list[int]]:
        from mft_plugin.data.labels import IGNORE_INDEX

        turns = self.turns(record)
        text = tokenizer.apply_chat_template(turns, tokenize=False, chat_template=self.template(tokenizer))
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids, spans = encoded["input_ids"], encoded["offset_mapping"]
        labels = [IGNORE_INDEX] * len(ids)
        trained_roles = {self.role_names().get(role, role) for role in self.params.roles_to_train}
        # (token ids, option) for the end-of-turn tokens, then the EOS token, each labelled as its option says
        closers = [(self.end_of_turn_ids(tokenizer), self.params.eot_option), ({tokenizer.eos_token_id}, self.params.train_on_eos)]
        cursor, found = 0, [[] for _ in closers]
        for i, turn in enumerate(turns):
            begin = text.find(turn["content"], cursor)
            if begin < 0:
                raise RecordError(f"{self.params.field_messages}[{i}]: the template does not write the content unchanged")
            thinking = turn.get(self.params.template_thinking_key)
            reasoning = text.rfind(thinking, cursor, begin) if thinking else -1  # the trace, where the template writes it
            cursor = end = begin + len(turn["content"])
            begin = reasoning if reasoning >= 0 else begin  # as in Axolotl, a trained turn's trace is trained too
            trained = train_on_inputs or turn["role"] in trained_roles
            for t in [t for t, (start, stop) in enumerate(spans) if start < end and stop > begin] if trained else []:
                labels[t] = ids[t]
            after = next((t for t, (start, _) in enumerate(spans) if start >= end), len(ids))
            for (closing, option), seen in zip(closers, found):
                at = next((t for t in range(after, min(after + EOS_SEARCH + 1, len(ids))) if ids[t] in closing), None)
                if at is not None:
                    seen.append(at)
                    if option == "all" or (option == "turn" and trained):
                        labels[at] = ids[at]
        for (_, option), seen in zip(closers, found):
            if option == "last" and seen:
                labels[seen[-1]] = ids[seen[-1]]
        return {"input_ids": ids, "labels": labels}
