"""The built-in data formats (Axolotl's ``type:`` names), registered through the ``mft_plugin`` entry
point like any plugin."""

from __future__ import annotations

from mft_plugin.hookspecs import hookimpl
from mft_plugin.strategies.formats.alpaca import AlpacaFormat, JeopardyFormat
from mft_plugin.strategies.formats.chat_template import ChatTemplateFormat
from mft_plugin.strategies.formats.completion import CompletionFormat
from mft_plugin.strategies.formats.input_output import InputOutputFormat
from mft_plugin.strategies.formats.pretokenized import PretokenizedFormat


@hookimpl
def mft_register_data_formats() -> list[type]:
    return [CompletionFormat, AlpacaFormat, JeopardyFormat, InputOutputFormat, ChatTemplateFormat, PretokenizedFormat]
