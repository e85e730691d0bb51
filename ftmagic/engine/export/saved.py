"""Make a saved folder self-describing: the training template and the answer-ending tokens.

Called when a run writes its adapter or weights, and copied along by every export, so
that plain transformers, vLLM and llama.cpp's converter read the prompt format and the
stop tokens from the folder itself (see :mod:`ftmagic.data.portable` for what is written).
A classifier on a decoder read the EOS ftmagic puts after each text; its saved tokenizer
appends that EOS itself, so ``pipeline("text-classification")`` reads what training read.

Example::

    save_tokenizer(out, tokenizer, config)        # tokenizer files with the training chat_template
    write_generation_config(out, tokenizer, config)   # eos_token_id: [EOS, end-of-turn]
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

from ftmagic.data.pairs import eos_after_text, special_tokens_around
from ftmagic.data.portable import answer_end_ids, portable_template
from ftmagic.data.templates import resolve_template

GENERATION_CONFIG = "generation_config.json"


def run_template(tokenizer, config):
    """The :class:`~ftmagic.data.templates.ChatTemplate` a run trained with (its ``template`` key)."""
    return resolve_template(tokenizer, getattr(config, "template", None))


def save_tokenizer(out, tokenizer, config) -> None:
    """``tokenizer.save_pretrained(out)`` with the run's portable template as ``chat_template``; for a
    classifier whose texts ended in an EOS the tokenizer does not add, a tokenizer that adds it.

    The tokenizer object is left as it was (the live run keeps rendering with it).
    """
    source = portable_template(tokenizer, run_template(tokenizer, config), getattr(config, "system_prompt", None))
    before = tokenizer.chat_template
    tokenizer.chat_template = source
    try:
        if getattr(config, "objective", "sft") == "classify" and eos_after_text(tokenizer):
            save_appending_eos(out, tokenizer, trust_remote_code=bool(getattr(config, "trust_remote_code", False)))
        else:
            tokenizer.save_pretrained(str(out))
    finally:
        tokenizer.chat_template = before


def save_appending_eos(out, tokenizer, trust_remote_code: bool = False) -> bool:
    """Save ``tokenizer`` to ``out`` so that, loaded again, it ends each text with EOS as ftmagic's
    classifier training did (:func:`~ftmagic.data.pairs.encode_texts`); True when it does.

    The EOS is appended by the fast tokenizer's post-processor (after whatever it adds already,
    e.g. a BOS). Some tokenizer classes rebuild their post-processor on loading; the folder is
    loaded back to check, and where the EOS did not survive (or the tokenizer is not a fast one)
    the plain tokenizer is saved instead: the printed snippet then adds the EOS by hand.

    Example::

        save_appending_eos("runs/cls", tokenizer)   # True: tokenizer("great")["input_ids"][-1] == eos
    """
    from ftmagic.engine.models import load_tokenizer

    sample = "Hello world"
    prefix, suffix = special_tokens_around(tokenizer)
    expected = prefix + list(tokenizer(sample, add_special_tokens=False)["input_ids"]) + suffix
    with _eos_appended(tokenizer) as appending:
        tokenizer.save_pretrained(str(out))
    if appending and load_tokenizer(str(out), trust_remote_code)(sample)["input_ids"] == expected:
        return True
    tokenizer.save_pretrained(str(out))
    return False


@contextmanager
def _eos_appended(tokenizer):
    """While inside, a fast tokenizer appends EOS after each text (yields False, changing nothing, for others)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    eos, eos_id = getattr(tokenizer, "eos_token", None), getattr(tokenizer, "eos_token_id", None)
    if backend is None or not hasattr(backend, "post_processor") or eos is None or eos_id is None:
        yield False
        return
    from tokenizers import processors

    before = backend.post_processor
    try:  # a token the template syntax cannot name (one with a space) leaves the tokenizer as it is
        append = processors.TemplateProcessing(single=f"$A:0 {eos}:0", pair=f"$A:0 $B:1 {eos}:1",
                                               special_tokens=[(str(eos), int(eos_id))])
    except Exception:  # noqa: BLE001 - tokenizers raises its own exception types for a bad template
        yield False
        return
    backend.post_processor = append if before is None else processors.Sequence([before, append])
    try:
        yield True
    finally:
        backend.post_processor = before


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
