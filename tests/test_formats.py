"""Data formats: each built-in's tokens and labels against hand-written expectations, their YAML
validation, and a third-party format through the registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mft_plugin.config.errors import ConfigError, validate_config
from mft_plugin.data.labels import IGNORE_INDEX
from mft_plugin.registry import default_registry
from mft_plugin.strategy import RecordError
from tests.tiny import REFERENCE_MODEL

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is a cat?"},
    {"role": "assistant", "content": "A small animal."},
    {"role": "user", "content": "And a dog?"},
    {"role": "assistant", "content": "A loyal one."},
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(REFERENCE_MODEL)


def data_format(name: str, **params: Any) -> Any:
    return default_registry().get("format", name).cls(**params)


def texts(tokenizer: PreTrainedTokenizerBase, row: dict[str, list[int]]) -> tuple[str, str]:
    """The whole record and its labelled tokens, decoded (labels must be the input ids where set)."""
    assert len(row["input_ids"]) == len(row["labels"])
    assert all(label in (token, IGNORE_INDEX) for token, label in zip(row["input_ids"], row["labels"]))
    labelled = [token for token, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    return tokenizer.decode(row["input_ids"]), tokenizer.decode(labelled)


def test_completion_labels_every_token_and_ends_with_eos(tokenizer: PreTrainedTokenizerBase) -> None:
    row = data_format("completion", field="body").tokenize({"body": "Licensed under the MIT."}, tokenizer, False)
    assert texts(tokenizer, row) == ("<s>Licensed under the MIT.</s>", "<s>Licensed under the MIT.</s>")


@pytest.mark.parametrize(
    ("record", "prompt"),
    [
        ({"instruction": "Name the capital of France.", "input": "", "output": "Paris."},
         "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
         "### Instruction:\nName the capital of France.\n\n### Response:\n"),
        ({"instruction": "Translate.", "input": "chat", "output": "Paris."},
         "Below is an instruction that describes a task, paired with an input that provides further context. "
         "Write a response that appropriately completes the request.\n\n"
         "### Instruction:\nTranslate.\n\n### Input:\nchat\n\n### Response:\n"),
    ],
    ids=["no-input", "input"],
)  # fmt: skip
def test_alpaca_masks_the_prompt(tokenizer: PreTrainedTokenizerBase, record: dict[str, str], prompt: str) -> None:
    alpaca = data_format("alpaca")
    assert texts(tokenizer, alpaca.tokenize(record, tokenizer, False)) == (f"<s>{prompt}Paris.</s>", "Paris.</s>")
    assert texts(tokenizer, alpaca.tokenize(record, tokenizer, True)) == (f"<s>{prompt}Paris.</s>",) * 2


def test_input_output_labels_the_flagged_segments(tokenizer: PreTrainedTokenizerBase) -> None:
    record = {"segments": [{"label": False, "text": "<s>Q: two and two?"}, {"label": True, "text": " A: four</s>"},
                           {"label": False, "text": " (checked)"}]}  # fmt: skip
    row = data_format("input_output").tokenize(record, tokenizer, False)
    assert texts(tokenizer, row) == ("<s>Q: two and two? A: four</s> (checked)", " A: four</s>")
    assert texts(tokenizer, data_format("input_output").tokenize(record, tokenizer, True))[1] == texts(tokenizer, row)[0]


@pytest.mark.parametrize(
    ("params", "train_on_inputs", "labelled"),
    [
        ({}, False, "A small animal.</s>A loyal one.</s>"),
        ({"train_on_eos": "none"}, False, "A small animal.A loyal one."),
        ({"train_on_eos": "all"}, False, "</s></s>A small animal.</s></s>A loyal one.</s>"),
        ({"train_on_eos": "last"}, False, "A small animal.A loyal one.</s>"),
        ({"roles_to_train": ["user"]}, False, "What is a cat?</s>And a dog?</s>"),
        ({"roles_to_train": ["human"]}, False, "What is a cat?</s>And a dog?</s>"),  # mapped like the data's roles
        ({}, True, "Be brief.</s>What is a cat?</s>A small animal.</s>And a dog?</s>A loyal one.</s>"),
    ],
    ids=["default", "eos-none", "eos-all", "eos-last", "user-turns", "role-alias", "train-on-inputs"],
)
def test_chat_template_labels(
    tokenizer: PreTrainedTokenizerBase, params: dict[str, Any], train_on_inputs: bool, labelled: str
) -> None:
    row = data_format("chat_template", **params).tokenize({"messages": CONVERSATION}, tokenizer, train_on_inputs)
    whole = "".join(f"### {m['role']}:\n{m['content']}</s>\n" for m in CONVERSATION)
    assert texts(tokenizer, row) == (f"<s>{whole}", labelled)


def test_chat_template_reads_sharegpt_fields_through_the_mappings(tokenizer: PreTrainedTokenizerBase) -> None:
    sharegpt = {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}
    chat = data_format("chat_template", field_messages="conversations",
                       message_property_mappings={"role": "from", "content": "value"})  # fmt: skip
    assert texts(tokenizer, chat.tokenize(sharegpt, tokenizer, False)) == (
        "<s>### user:\nHi?</s>\n### assistant:\nHello.</s>\n", "Hello.</s>"
    )


def test_chat_template_by_name_and_as_jinja(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = {"messages": CONVERSATION[1:3]}
    chatml = data_format("chat_template", chat_template="chatml").tokenize(messages, tokenizer, False)
    assert texts(tokenizer, chatml) == (
        "<|im_start|>user\nWhat is a cat?<|im_end|>\n<|im_start|>assistant\nA small animal.<|im_end|>\n", "A small animal."
    )  # no EOS in ChatML's text: only the content is labelled
    jinja = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
    own = data_format("chat_template", chat_template="jinja", chat_template_jinja=jinja).tokenize(messages, tokenizer, False)
    # " A" carries the template's space: labelled with the content it starts, as Axolotl labels it
    assert texts(tokenizer, own) == ("[user] What is a cat?</s>[assistant] A small animal.</s>", " A small animal.</s>")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"conversation": []}, "field 'messages' (field_messages) is missing"),
        ({"messages": []}, "field 'messages' is an empty conversation"),
        ({"messages": "hi"}, "field 'messages' (field_messages) is a str, not a list of messages"),
        ({"messages": [{"role": "narrator", "content": "Once."}]}, "messages[0]: unknown role 'narrator'; known: "
         "assistant, gpt, human, system, tool, user (map others with roles:)"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0] needs a string role and content"),
    ],
    ids=["no-field", "empty", "not-a-list", "unknown-role", "null-content"],
)  # fmt: skip
def test_chat_template_bad_records(tokenizer: PreTrainedTokenizerBase, record: dict[str, Any], message: str) -> None:
    with pytest.raises(RecordError) as caught:
        data_format("chat_template").tokenize(record, tokenizer, False)
    assert str(caught.value).startswith(message)


def test_tokenizer_without_a_template_is_refused(tokenizer: PreTrainedTokenizerBase) -> None:
    bare = AutoTokenizer.from_pretrained(REFERENCE_MODEL)
    bare.chat_template = None
    with pytest.raises(RecordError, match=r"has no chat template; choose one of Axolotl's named templates \(chatml, llama3"):
        data_format("chat_template").tokenize({"messages": CONVERSATION}, bare, False)


def test_axolotls_named_templates_and_the_fallback(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    """Axolotl's template files render as in Axolotl (llama3 trims the content and opens with BOS);
    ``tokenizer_default_fallback_<name>`` takes the tokenizer's own template when it has one."""
    messages = {"messages": CONVERSATION[1:3]}
    llama3 = data_format("chat_template", chat_template="llama3").tokenize(messages, tokenizer, False)
    assert texts(tokenizer, llama3) == (
        "<s><|start_header_id|>user<|end_header_id|>\n\nWhat is a cat?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA small animal.<|eot_id|>", "A small animal."
    )
    fallback = data_format("chat_template", chat_template="tokenizer_default_fallback_llama3")
    assert fallback.tokenize(messages, tokenizer, False) == data_format("chat_template").tokenize(messages, tokenizer, False)
    bare = AutoTokenizer.from_pretrained(REFERENCE_MODEL)
    bare.chat_template = None
    assert fallback.tokenize(messages, bare, False) == llama3
    (tmp_path / "mine.jinja").write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    from_file = data_format("chat_template", chat_template="jinja", chat_template_jinja=str(tmp_path / "mine.jinja"))
    assert texts(tokenizer, from_file.tokenize(messages, tokenizer, False))[0] == "user: What is a cat?\nassistant: A small animal.\n"


# ---------------------------------------------------------------- the YAML


def chat_file(tmp_path: Path) -> Path:
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    return path


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"type": "alpacca"}, "datasets.0: unknown format 'alpacca'; available: alpaca, chat_template, completion, "
                              "input_output, jeopardy, pretokenized; did you mean 'alpaca'?"),
        ({"type": "chat_template", "chat_template": "llama99"},
         "datasets.0.chat_template: 'llama99' is not a chat template: use tokenizer_default, jinja (with "
         "chat_template_jinja), one of Axolotl's named templates (alpaca, aya, chatml, "),
        ({"type": "chat_template", "field_messages": "conversations"},
         "datasets.0.field_messages: 'conversations' is not a field of {chat} (its records have: messages)"),
        ({"type": "chat_template", "roles_to_trian": ["user"]},
         "datasets.0.roles_to_trian: unknown key; did you mean 'roles_to_train'?"),
        ({"type": "alpaca"}, "datasets.0: 'instruction', 'output' are not fields of {chat} (its records have: messages)"),
        ({"type": "chat_template", "chat_template": "jinja"},
         "datasets.0: chat_template: jinja and chat_template_jinja go together: give both or neither"),
    ],
    ids=["unknown-type", "unknown-template", "missing-messages", "misspelled-key", "alpaca-fields", "jinja-alone"],
)  # fmt: skip
def test_dataset_entries_are_validated_by_their_format(
    base_config: dict[str, Any], tmp_path: Path, entry: dict[str, Any], expected: str
) -> None:
    chat = chat_file(tmp_path)
    with pytest.raises(ConfigError) as caught:
        validate_config({**base_config, "datasets": [{"path": str(chat), **entry}]})
    (problem,) = caught.value.problems
    assert problem.startswith(f"<config>: {expected.replace('{chat}', str(chat))}")


def test_a_chat_entry_validates_with_its_keys(base_config: dict[str, Any], tmp_path: Path) -> None:
    entry = {"path": str(chat_file(tmp_path)), "type": "chat_template", "roles_to_train": ["assistant", "user"]}
    config = validate_config({**base_config, "datasets": [entry], "train_on_inputs": True})
    assert config.datasets[0].roles_to_train == ["assistant", "user"] and config.datasets[0].type == "chat_template"
    assert validate_config(base_config).datasets[0].type == "completion"  # the default, as in the paper


def test_a_top_level_chat_template_is_the_default_of_the_chat_entries(base_config: dict[str, Any], tmp_path: Path) -> None:
    """As in Axolotl: top-level ``chat_template`` renders every chat dataset that does not name its own."""
    chat = str(chat_file(tmp_path))
    entries = [{"path": chat, "type": "chat_template"}, {"path": chat, "type": "chat_template", "chat_template": "tokenizer_default"}]
    config = validate_config({**base_config, "datasets": entries, "test_datasets": [entries[0]], "chat_template": "chatml"})
    assert [entry.chat_template for entry in (*config.datasets, *config.test_datasets)] == ["chatml", "tokenizer_default", "chatml"]
    jinja = {"chat_template": "jinja", "chat_template_jinja": "{{ messages }}"}
    (entry,) = validate_config({**base_config, "datasets": entries[:1], **jinja}).datasets
    assert (entry.chat_template, entry.chat_template_jinja) == ("jinja", "{{ messages }}")
    assert validate_config({**base_config, "datasets": entries[:1], "chat_template": None}).datasets[0].chat_template == "tokenizer_default"


def test_a_top_level_chat_template_is_the_tokenizers(base_config: dict[str, Any], tmp_path: Path) -> None:
    """As in Axolotl (``loaders/tokenizer.py``): the top-level template is set on the tokenizer (saved with the
    model), with chat datasets or without; a bad name is refused by the chat format's own check."""
    from mft_plugin.models.loading import load_tokenizer

    config = validate_config({**base_config, "chat_template": "chatml"})  # raw-text datasets only
    chatml = (Path(__file__).parents[1] / "strategies/formats/chat_templates/chatml.jinja").read_text(encoding="utf-8")
    assert config.tokenizer_chat_template == {"chat_template": "chatml"}
    assert load_tokenizer(config).chat_template == chatml
    assert AutoTokenizer.from_pretrained(REFERENCE_MODEL).chat_template != chatml  # the shipped one is another
    jinja = validate_config({**base_config, "chat_template": "jinja", "chat_template_jinja": "{{ messages }}"})
    assert load_tokenizer(jinja).chat_template == "{{ messages }}"
    assert load_tokenizer(validate_config(base_config)).chat_template == AutoTokenizer.from_pretrained(REFERENCE_MODEL).chat_template
    with pytest.raises(ConfigError, match="not a chat template"):
        validate_config({**base_config, "chat_template": "no_such_template"})
    with pytest.raises(ConfigError) as caught:
        validate_config({**base_config, "eot_tokens": ["</s>"]})  # no effect without a chat entry: an error
    assert "eot_tokens: ['</s>'] is the default of the datasets entries whose type takes it" in caught.value.problems[0]


@pytest.mark.parametrize(
    ("style", "prompt"),
    [
        ("chat", "SYSTEM: Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\nUSER: Name the capital of France.\nASSISTANT:"),
        ("chatml", "<|im_start|>system\nBelow is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.<|im_end|>\n<|im_start|>user\nName the capital of France.<|im_end|>\n<|im_start|>assistant\n"),
    ],
)  # fmt: skip
def test_alpaca_prompt_styles_as_axolotl_writes_them(
    tokenizer: PreTrainedTokenizerBase, base_config: dict[str, Any], tmp_path: Path, style: str, prompt: str
) -> None:
    """``type: alpaca:chat`` is Axolotl's ``AlpacaPrompter`` in its chat style (prompters.py), with the prompt masked."""
    records = tmp_path / "alpaca.jsonl"
    records.write_text(json.dumps({"instruction": "Name the capital of France.", "input": "", "output": "Paris."}) + "\n")
    (entry,) = validate_config({**base_config, "datasets": [{"path": str(records), "type": f"alpaca:{style}"}]}).datasets
    assert (entry.type, entry.prompt_style) == ("alpaca", style)
    record = {"instruction": "Name the capital of France.", "input": "", "output": "Paris."}
    row = data_format("alpaca", prompt_style=style).tokenize(record, tokenizer, False)
    assert texts(tokenizer, row) == (f"<s>{prompt}Paris.</s>", "Paris.</s>")


def test_jeopardy_is_axolotls_clue_category_and_answer_in_the_alpaca_prompt(tokenizer: PreTrainedTokenizerBase) -> None:
    """Axolotl's ``JeopardyPromptTokenizingStrategy``: instruction = question, input = category, response
    "what is " + answer; the prompt is ``AlpacaPrompter``'s with input (prompters.py), masked."""
    record = {"question": "It renews for one year.", "category": "CLAUSES", "answer": "clause 4"}
    row = data_format("jeopardy").tokenize(record, tokenizer, False)
    prompt = ("Below is an instruction that describes a task, paired with an input that provides further context. Write a "
              "response that appropriately completes the request.\n\n### Instruction:\nIt renews for one year.\n\n"
              "### Input:\nCLAUSES\n\n### Response:\n")  # fmt: skip
    assert texts(tokenizer, row) == (f"<s>{prompt}what is clause 4</s>", "what is clause 4</s>")


def test_pretokenized_records_are_used_as_they_are(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer("The licensee shall pay.")["input_ids"]
    labelled = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX, IGNORE_INDEX, *ids[2:]]}
    assert data_format("pretokenized").tokenize(labelled, tokenizer, False) == {"input_ids": ids, "labels": labelled["labels"]}
    assert data_format("pretokenized").tokenize({"input_ids": ids}, tokenizer, False) == {"input_ids": ids, "labels": ids}
    for record, message in [
        ({"input_ids": [*ids, len(tokenizer)]}, "past the tokenizer's"),
        ({"input_ids": ids, "labels": ids[1:]}, "have"),
        ({"input_ids": ids, "labels": [*ids[1:], IGNORE_INDEX]}, "each position's input id or -100"),  # shifted already
        ({"input_ids": ids, "attention_mask": [1] * (len(ids) - 1) + [0]}, "padding inside a record"),
        ({"input_ids": "1 2 3"}, "'input_ids' must be a list of integers"),
    ]:
        with pytest.raises(RecordError, match=message):
            data_format("pretokenized").tokenize(record, tokenizer, False)


def test_an_empty_type_is_axolotls_pretokenized_data(base_config: dict[str, Any], tmp_path: Path) -> None:
    data = tmp_path / "ids.jsonl"
    data.write_text(json.dumps({"input_ids": [1, 100, 2], "attention_mask": [1, 1, 1], "labels": [-100, 100, 2]}) + "\n")
    config = validate_config({**base_config, "datasets": [{"path": str(data), "type": None}]})
    assert config.datasets[0].type == "pretokenized"
    with pytest.raises(ConfigError, match="input_ids"):  # a text file is not token ids
        validate_config({**base_config, "datasets": [{**base_config["datasets"][0], "type": None}]})


def test_general_data_stays_raw_text(base_config: dict[str, Any], tmp_path: Path) -> None:
    entry = {"path": str(chat_file(tmp_path)), "type": "chat_template"}
    with pytest.raises(ConfigError, match=r"general_eval_datasets\.0\.type: Input should be 'completion'"):
        validate_config({**base_config, "general_eval_datasets": [entry]})


def test_formats_are_listed_with_their_keys(capsys: pytest.CaptureFixture[str]) -> None:
    from mft_plugin.cli import main

    assert main(["--list"]) == 0
    rows = [line.split()[:3] for line in capsys.readouterr().out.splitlines() if line.startswith("format ")]
    assert [name for _, name, dist in rows if dist == "mft-plugin"] == ["alpaca", "chat_template", "completion", "input_output", "jeopardy", "pretokenized"]
