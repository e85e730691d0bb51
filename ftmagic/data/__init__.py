"""The data pipeline: load, detect the format, render with a chat template, mask, pack.

Pure Python: importing it never imports torch (transformers is imported inside functions
that need a tokenizer). Training and the previewer both go through these functions.

Example::

    from ftmagic.data import prepare_data, encode_example, render_prompt
    prepared = prepare_data(config, tokenizer)                 # .train, .eval, .stats
    enc = encode_example(tokenizer, {"prompt": "2+2=", "completion": "4"}, max_seq_len=64)
    text = render_prompt(tokenizer, "2+2=")                    # what generation starts from
"""

from ftmagic.data.build import Built, build_examples
from ftmagic.data.encode import Encoded, as_conversation, encode_conversations, encode_example, encode_prompt, render_prompt
from ftmagic.data.formats import FORMAT_NAMES, Detection, detect_format, to_conversation
from ftmagic.data.load import LoadedData, load_data
from ftmagic.data.pack import pack, padding_share
from ftmagic.data.pipeline import PreparedData, Source, data_sources, prepare_data
from ftmagic.data.problems import Problem
from ftmagic.data.templates import NAMED_TEMPLATES, ChatTemplate, resolve_template

__all__ = [
    "Built", "build_examples", "Encoded", "as_conversation", "encode_conversations", "encode_example",
    "encode_prompt", "render_prompt", "FORMAT_NAMES", "Detection", "detect_format", "to_conversation", "LoadedData",
    "load_data", "pack", "padding_share", "PreparedData", "Source", "data_sources", "prepare_data", "Problem",
    "NAMED_TEMPLATES", "ChatTemplate", "resolve_template",
]
