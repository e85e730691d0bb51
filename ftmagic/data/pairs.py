"""Preference pairs and labelled texts as training rows: the encodings of the non-SFT objectives.

A preference pair becomes two sequences, the prompt followed by the chosen completion and
the prompt followed by the rejected one. Both are rendered and tokenized by the very code
supervised fine-tuning uses (:mod:`ftmagic.data.encode`), so their prompt tokens are what
generation sees, and only the completions' assistant tokens carry labels: the
log-probabilities DPO and ORPO sum cover exactly those tokens (up to and including EOS).

A labelled text becomes its tokens, with the tokenizer's own special tokens around it
(``[CLS] ... [SEP]`` for BERT-style encoders); a decoder without a closing special token
gets EOS appended, so a causal model's last position, where its head reads, is the same
token for every text. Truncation keeps those special tokens. The loss of a labelled text
is one cross-entropy, of the label, at the one position the head reads
(:func:`head_position`): that position is its only trained token; the others are context.

Example::

    pair = to_preference({"prompt": "2+2?", "chosen": "4", "rejected": "5"})
    enc = encode_pairs(tok, [pair], max_seq_len=64)[0]
    enc.chosen.labels, enc.to_dict().keys()            # dict_keys(['chosen', 'rejected'])
    encode_texts(tok, ["a fine film"], max_seq_len=64)[0].input_ids
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Optional

from ftmagic.data.encode import Encoded, label_step, render_step, tokenize_step
from ftmagic.data.problems import RecordError

SIDES = ("chosen", "rejected")


@dataclass
class PairEncoded:
    """The two encoded sequences of a preference record."""

    chosen: Encoded
    rejected: Encoded
    warnings: list = field(default_factory=list)

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated

    @property
    def length(self) -> int:
        """The longer side's tokens before truncation."""
        return max(self.chosen.length, self.rejected.length)

    @property
    def lengths(self) -> list:
        return [len(self.chosen.input_ids), len(self.rejected.input_ids)]

    @property
    def trained_tokens(self) -> int:
        """Completion tokens whose log-probabilities count; 0 when either side has none left."""
        c, r = self.chosen.trained_tokens, self.rejected.trained_tokens
        return c + r if c and r else 0

    @property
    def eos_added(self) -> bool:
        return self.chosen.eos_added or self.rejected.eos_added

    @property
    def no_eos(self) -> bool:
        return self.chosen.no_eos

    @property
    def text(self) -> str:
        return self.chosen.text

    def to_dict(self) -> dict:
        """The training row: ``{"chosen": {"input_ids", "labels"}, "rejected": {...}}``."""
        return {"chosen": self.chosen.to_dict(), "rejected": self.rejected.to_dict()}


@dataclass
class TextEncoded:
    """One labelled text, tokenized (``label`` is the raw label until the label set is known)."""

    input_ids: list
    label: object
    length: int  # tokens before truncation
    truncated: bool = False
    warnings: list = field(default_factory=list)
    text: str = ""
    eos_added: bool = False
    no_eos: bool = False
    head_index: int = -1  # the position the head reads (see head_position): the last token, or [CLS]

    @property
    def lengths(self) -> list:
        return [len(self.input_ids)]

    @property
    def trained_tokens(self) -> int:
        """The one position with a loss: the head reads it and is trained to predict the label there."""
        return 1 if self.input_ids else 0

    def to_dict(self, label_index: Optional[dict] = None) -> dict:
        """The training row: ``{"input_ids", "label"}`` (the label's index when ``label_index`` is given)."""
        label = label_index[self.label] if label_index is not None else self.label
        return {"input_ids": list(self.input_ids), "label": label}


def encode_pairs(tokenizer, pairs: list, *, template=None, max_seq_len: Optional[int] = None) -> list:
    """Encode preference pairs; each result is a :class:`PairEncoded` or a :class:`RecordError`."""
    return finish_pairs(tokenizer, *start_pairs(tokenizer, pairs, template=template), max_seq_len)


def start_pairs(tokenizer, pairs: list, *, template=None) -> tuple:
    """Render both sides of every pair (the tokenizer runs in :func:`tokenize_pairs`)."""
    conversations = [pair.conversation(side) for pair in pairs for side in SIDES]
    rendered = render_step(tokenizer, conversations, template=template, train_on="completions")
    return rendered, None


def tokenize_pairs(tokenizer, rendered: list):
    return tokenize_step(tokenizer, rendered)


def finish_pairs(tokenizer, rendered: list, encodings, max_seq_len: Optional[int]) -> list:
    if encodings is None:
        encodings = tokenize_step(tokenizer, rendered)
    flat = label_step(tokenizer, rendered, encodings, max_seq_len)
    out = []
    for k in range(0, len(flat), 2):
        chosen, rejected = flat[k], flat[k + 1]
        bad = next((x for x in (chosen, rejected) if isinstance(x, RecordError)), None)
        if bad is not None:
            out.append(bad)
            continue
        out.append(PairEncoded(chosen, rejected, warnings=_unique(chosen.warnings + rejected.warnings)))
    return out


def _unique(items: list) -> list:
    return list(dict.fromkeys(items))


# --------------------------------------------------------------------------- classification

_SPECIALS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def special_tokens_around(tokenizer) -> tuple:
    """``(prefix, suffix)`` token ids the tokenizer puts around a text; a decoder with no closing
    special token gets EOS as its suffix (the token a causal model's head reads).

    Example::

        special_tokens_around(bert_tokenizer)    # ([101], [102])
        special_tokens_around(llama_tokenizer)   # ([1], [2]): BOS, and EOS appended
    """
    try:
        return _SPECIALS[tokenizer]
    except (KeyError, TypeError):
        pass
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    prefix, suffix = [], []
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            prefix, suffix = list(full[:start]), list(full[start + len(plain):])
            break
    if not suffix and getattr(tokenizer, "eos_token_id", None) is not None:
        suffix = [tokenizer.eos_token_id]
    answer = (prefix, suffix)
    try:
        _SPECIALS[tokenizer] = answer
    except TypeError:
        pass
    return answer


def eos_after_text(tokenizer) -> bool:
    """Whether :func:`encode_texts` ends each text with an EOS that the tokenizer itself does not add
    (so a runtime that tokenizes plainly must add it to read what the head was trained on).

    Example::

        eos_after_text(llama_tokenizer)   # True: [BOS] text, then ftmagic's EOS
        eos_after_text(bert_tokenizer)    # False: [CLS] text [SEP] is the tokenizer's own
    """
    suffix = special_tokens_around(tokenizer)[1]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(suffix) and list(full[-len(suffix):]) != suffix


def head_position(tokenizer) -> int:
    """Where a classification head reads an encoded text (:func:`encode_texts`): ``0`` for a
    BERT-style encoder, whose tokenizer opens each text with its own ``[CLS]`` (the pooled
    output), ``-1`` otherwise: a decoder's ``score`` reads the last token (see
    :mod:`ftmagic.engine.heads`), the EOS :func:`special_tokens_around` ends each text with.

    Only the tokenizer is known to the previewer, so the encoder is recognised by its ``[CLS]``.

    Example::

        head_position(bert_tokenizer)     # 0: [CLS]
        head_position(llama_tokenizer)    # -1: the EOS after the text
    """
    cls = getattr(tokenizer, "cls_token_id", None)
    prefix = special_tokens_around(tokenizer)[0]
    return 0 if cls is not None and prefix[:1] == [cls] and not eos_after_text(tokenizer) else -1


def encode_texts(tokenizer, texts: list, labels: Optional[list] = None, *, max_seq_len: Optional[int] = None) -> list:
    """Tokenize labelled texts in one batch: a :class:`TextEncoded` each (special tokens kept when truncated).

    Example::

        encode_texts(tok, ["great", "dull"], ["pos", "neg"], max_seq_len=32)[1].label    # 'neg'
    """
    from ftmagic.data.encode import _tokenize_ids

    prefix, suffix = special_tokens_around(tokenizer)
    head = head_position(tokenizer)
    labels = labels if labels is not None else [None] * len(texts)
    out = []
    for text, label, core in zip(texts, labels, _tokenize_ids(tokenizer, texts)):
        ids = prefix + list(core) + suffix
        length = len(ids)
        truncated = bool(max_seq_len) and length > max_seq_len
        if truncated:
            keep = max(0, max_seq_len - len(prefix) - len(suffix))
            ids = prefix + list(core[:keep]) + suffix
        out.append(TextEncoded(ids, label, length, truncated, text=text, head_index=head))
    return out
