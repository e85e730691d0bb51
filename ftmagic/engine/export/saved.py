"""Make a saved folder self-describing: the training template and the answer-ending tokens.

Called when a run writes its adapter or weights, and copied along by every export, so
that plain transformers, vLLM and llama.cpp's converter read the prompt format and the
stop tokens from the folder itself (see :mod:`ftmagic.data.portable` for what is written).

Example::

    save_tokenizer(out, tokenizer, config)        # tokenizer files with the training chat_template
    write_generation_config(out, tokenizer, config)   # eos_token_id: [EOS, end-of-turn]
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ftmagic.data.portable import answer_end_ids, portable_template
from ftmagic.data.templates import resolve_template

GENERATION_CONFIG = "generation_config.json"


def run_template(tokenizer, config):
    """The :class:`~ftmagic.data.templates.ChatTemplate` a run trained with (its ``template`` key)."""
    return resolve_template(tokenizer, getattr(config, "template", None))


def save_tokenizer(out, tokenizer, config) -> None:
    """``tokenizer.save_pretrained(out)`` with the run's portable template as ``chat_template``.

    The tokenizer object is left as it was (the live run keeps rendering with it).
    """
    source = portable_template(tokenizer, run_template(tokenizer, config), getattr(config, "system_prompt", None))
    before = tokenizer.chat_template
    tokenizer.chat_template = source
    try:
        tokenizer.save_pretrained(str(out))
    finally:
        tokenizer.chat_template = before


def write_generation_config(out, tokenizer, config, base_dir=None) -> list:
    """Write ``generation_config.json`` whose ``eos_token_id`` lists every answer-ending token.

    Other settings come from the folder's own file, else the base model's, else defaults.
    Returns the end-token ids.
    """
    from transformers import GenerationConfig

    out = Path(out)
    ends = answer_end_ids(tokenizer, run_template(tokenizer, config))
    generation = GenerationConfig()
    if (out / GENERATION_CONFIG).is_file():
        generation = GenerationConfig.from_pretrained(str(out))
    elif base_dir is not None:
        try:  # a local folder, or a Hub id already in the cache
            generation = GenerationConfig.from_pretrained(str(base_dir))
        except (OSError, ValueError):
            pass  # the base has none: transformers' defaults
    if ends:
        generation.eos_token_id = ends if len(ends) > 1 else ends[0]
    if tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        generation.bos_token_id = tokenizer.bos_token_id
    generation.save_pretrained(str(out))
    return ends


def copy_generation_config(source_dir, target_dir) -> None:
    """Carry a run's generation config into a folder made from it (e.g. the merged model)."""
    src = Path(source_dir) / GENERATION_CONFIG
    if src.is_file():
        shutil.copyfile(src, Path(target_dir) / GENERATION_CONFIG)
