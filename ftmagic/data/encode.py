"""Tokenize rendered examples into ``input_ids`` and ``labels`` (-100 where no loss): THE encoding.

Training (:func:`ftmagic.data.prepare_data`) and the previewer both go through
:func:`render_step`, :func:`tokenize_step` and :func:`label_step` (what
:func:`encode_conversations` runs); :func:`encode_example` is the same for one record,
and :func:`render_prompt` is the text a model sees at generation time.

The whole rendered text is tokenized at once, so tokens are exactly what the model
would read. Each boundary of a trained span must fall between two tokens; if a token
straddles one (the tokenizer merged prompt and answer characters), that example is
tokenized segment by segment instead, which keeps the prompt tokens identical to the
tokens of the prompt alone (what generation sees). ``Encoded.method`` says which.

Example::

    enc = encode_example(tok, {"prompt": "2+2=", "completion": "4"}, max_seq_len=64)
    enc.input_ids, enc.labels      # labels are -100 except on "4<|im_end|>"
    render_prompt(tok, "2+2=")     # '<|im_start|>user\\n2+2=<|im_end|>\\n<|im_start|>assistant\\n'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ftmagic.constants import IGNORE_INDEX
from ftmagic.data.formats import detect_format, parse_messages, to_conversation
from ftmagic.data.problems import RecordError
from ftmagic.data.render import Rendered, render_conversations
from ftmagic.data.templates import ChatTemplate, resolve_template
from ftmagic.errors import DataError, a_type


@dataclass
class Encoded:
    """One tokenized example, with what the previewer shows about it."""

    input_ids: list
    labels: list
    segments: list  # rendered (text, trained) segments, before truncation
    length: int  # tokens before truncation
    truncated: bool = False
    method: str = "prefix"  # how answers were located ("prefix"/"search"/"text"), "+segments" if split
    eos_added: bool = False
    no_eos: bool = False
    warnings: list = field(default_factory=list)
    n_trained: int = -1  # tokens with a loss (labels != -100), counted once when encoded
    block_len: int = 0  # > 0: a long `text` record kept whole, trained as blocks of this many tokens

    @property
    def text(self) -> str:
        """The rendered text, exactly as the template produced it (EOS appended where needed)."""
        return "".join(t for t, _ in self.segments)

    @property
    def trained_tokens(self) -> int:
        if self.n_trained < 0:
            self.n_trained = len(self.labels) - self.labels.count(IGNORE_INDEX)
        return self.n_trained

    def to_dict(self) -> dict:
        """The training example: ``{"input_ids", "labels"}``."""
        return {"input_ids": list(self.input_ids), "labels": list(self.labels)}

    @property
    def split(self) -> bool:
        """A long ``text`` record split into blocks (``long_text: split``) rather than truncated."""
        return bool(self.block_len) and len(self.input_ids) > self.block_len

    @property
    def blocks(self) -> int:
        """How many training rows the example gives (a one-token tail block has nothing to predict)."""
        if not self.split:
            return 1
        n = len(self.input_ids)
        return -(-n // self.block_len) - (1 if n % self.block_len == 1 else 0)

    def row_lengths(self) -> list:
        """Token counts of :meth:`rows`, without building them."""
        n, size = len(self.input_ids), self.block_len
        if not self.split:
            return [n]
        return [min(size, n - a) for a in range(0, n, size) if n - a > 1]

    def rows(self) -> list:
        """The training rows: the example, or the consecutive ``block_len`` blocks of a split ``text`` record.

        Example::

            enc = encode_example(tok, {"text": long_text}, max_seq_len=512)   # long_text="split"
            [len(r["input_ids"]) for r in enc.rows()]                        # [512, 512, 87]
        """
        if not self.split:
            return [self.to_dict()]
        n = self.block_len
        return [{"input_ids": self.input_ids[a:a + n], "labels": self.labels[a:a + n]}
                for a in range(0, len(self.input_ids), n) if len(self.input_ids[a:a + n]) > 1]


def encode_conversations(tokenizer, conversations: list, *, template: Union[None, str, ChatTemplate] = None,
                         train_on: str = "completions", max_seq_len: Optional[int] = None,
                         long_text: str = "truncate") -> list:
    """Encode many conversations in one batch; each result is an :class:`Encoded` or a :class:`RecordError`.

    The three steps (:func:`render_step`, :func:`tokenize_step`, :func:`label_step`) are
    public so a caller can overlap the tokenizer (which runs outside the GIL) with
    rendering the next batch; the result is the same.

    Example::

        encode_conversations(tok, [conv1, conv2], max_seq_len=512)
    """
    rendered = render_step(tokenizer, conversations, template=template, train_on=train_on)
    return label_step(tokenizer, rendered, tokenize_step(tokenizer, rendered), max_seq_len, long_text)


def render_step(tokenizer, conversations: list, *, template: Union[None, str, ChatTemplate] = None,
                train_on: str = "completions") -> list:
    """Render conversations to trained/untrained text segments (:class:`Rendered` or :class:`RecordError` each)."""
    tpl = template if isinstance(template, ChatTemplate) else resolve_template(tokenizer, template)
    return render_conversations(tokenizer, tpl, conversations, train_on)


def tokenize_step(tokenizer, rendered: list) -> list:
    """Tokenize each rendered text in one batched call (fast tokenizers: Rust ``Encoding`` objects, else None)."""
    texts = [r.text for r in rendered if isinstance(r, Rendered)]
    return _tokenize(tokenizer, texts)


def label_step(tokenizer, rendered: list, encodings: list, max_seq_len: Optional[int],
               long_text: str = "truncate") -> list:
    """Labels from token offsets; examples whose span boundaries split a token are tokenized per segment.

    A plain ``text`` example longer than ``max_seq_len`` is cut to its first ``max_seq_len``
    tokens, or with ``long_text="split"`` kept whole to be trained as consecutive blocks
    (continual pre-training on long documents). Chat examples are always cut: a block
    of a conversation would train answers without their questions.
    """
    results: list = list(rendered)
    todo = [(n, r) for n, r in enumerate(rendered) if isinstance(r, Rendered)]
    split_later = []
    for (n, r), enc in zip(todo, encodings):
        labelled = _label_whole(enc, r) if enc is not None else None
        if labelled is None:
            split_later.append((n, r))
            continue
        results[n] = _make(labelled[0], labelled[1], r, r.method, max_seq_len, long_text)
    if split_later:
        pieces = [text for _, r in split_later for text, _ in r.segments]
        ids_of = iter(_tokenize_ids(tokenizer, pieces))
        for n, r in split_later:
            ids, labels = [], []
            for (_, trained), piece in zip(r.segments, ids_of):
                ids.extend(piece)
                labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))
            results[n] = _make(ids, labels, r, r.method + "+segments", max_seq_len, long_text)
    return results


def encode_example(tokenizer, record: Union[dict, list], *, fmt: str = "auto", template: Union[None, str, ChatTemplate] = None,
                   train_on: str = "completions", max_seq_len: Optional[int] = None, system_prompt: Optional[str] = None,
                   columns: Optional[dict] = None, long_text: str = "truncate") -> Encoded:
    """Encode one record (any supported format) or conversation exactly as training does.

    Example::

        enc = encode_example(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
        [tok.decode([i]) for i, l in zip(enc.input_ids, enc.labels) if l != -100]   # ['yo', '<|im_end|>']
    """
    conv = as_conversation(record, fmt=fmt, columns=columns, system_prompt=system_prompt)
    result = encode_conversations(tokenizer, [conv], template=template, train_on=train_on, max_seq_len=max_seq_len,
                                  long_text=long_text)[0]
    if isinstance(result, RecordError):
        raise DataError(f"record: {result.message}")
    return result


def as_conversation(record: Union[dict, list], *, fmt: str = "auto", columns: Optional[dict] = None,
                    system_prompt: Optional[str] = None) -> list:
    """A record of any format, or a list of messages, as a normalised conversation (DataError if unusable)."""
    try:
        if isinstance(record, list):
            conv = parse_messages(record, "messages", columns or {})
            if system_prompt and not (conv and conv[0]["role"] == "system"):
                conv.insert(0, {"role": "system", "content": system_prompt, "weight": 1})
            return conv
        if not isinstance(record, dict):
            raise DataError(f"record: {a_type(record)} is not a record; pass a dict or a list of messages")
        detection = detect_format([record], fmt, columns, source="record")
        return to_conversation(record, detection.format, detection.columns, system_prompt)
    except RecordError as exc:
        raise DataError(f"record: {exc.message}") from None


def render_prompt(tokenizer, prompt: Union[str, list], *, template: Union[None, str, ChatTemplate] = None,
                  system_prompt: Optional[str] = None) -> str:
    """The text a model sees before it answers ``prompt``: the training template plus the generation prompt.

    ``prompt`` is a user message, or a list of messages (the conversation so far). Tokenize
    the result with ``add_special_tokens=False`` (the template already wrote BOS where needed),
    or use :func:`encode_prompt`.

    Example::

        render_prompt(tok, "reverse: abc", system_prompt="Be brief.")
        # '<|im_start|>system\\nBe brief.<|im_end|>\\n<|im_start|>user\\nreverse: abc<|im_end|>\\n<|im_start|>assistant\\n'
    """
    tpl = template if isinstance(template, ChatTemplate) else resolve_template(tokenizer, template)
    if isinstance(prompt, str):
        conv = [{"role": "user", "content": prompt}]
    else:
        conv = [{"role": m["role"], "content": m["content"]} for m in as_conversation(list(prompt))]
    if system_prompt and conv[0]["role"] != "system":
        conv.insert(0, {"role": "system", "content": system_prompt})
    from ftmagic.data.templates import render_many

    text = render_many(tokenizer, tpl, [conv], add_generation_prompt=True)[0]
    if isinstance(text, Exception):
        raise DataError(f"prompt: the chat template rejects it ({str(text).strip().splitlines()[0] if str(text).strip() else type(text).__name__})")
    return text


def encode_prompt(tokenizer, prompt: Union[str, list], *, template: Union[None, str, ChatTemplate] = None,
                  system_prompt: Optional[str] = None) -> list:
    """Token ids of :func:`render_prompt` (what generation starts from).

    Example::

        ids = encode_prompt(tok, "reverse: abc")
    """
    text = render_prompt(tokenizer, prompt, template=template, system_prompt=system_prompt)
    return _tokenize_ids(tokenizer, [text])[0]


# --------------------------------------------------------------------------- tokenization


def _make(ids: list, labels: list, r: Rendered, method: str, max_seq_len: Optional[int],
          long_text: str = "truncate") -> Encoded:
    if r.bos_id is not None:
        ids, labels = [r.bos_id] + ids, [IGNORE_INDEX] + labels
    length = len(ids)
    too_long = bool(max_seq_len) and length > max_seq_len
    split = too_long and long_text == "split" and r.method == "text"
    truncated = too_long and not split
    if truncated:
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    return Encoded(ids, labels, r.segments, length, truncated, method, r.eos_added, r.no_eos, r.warnings,
                   len(labels) - labels.count(IGNORE_INDEX), block_len=max_seq_len if split else 0)


def _backend(tokenizer):
    return getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None


def _tokenize(tokenizer, texts: list) -> list:
    """Rust ``Encoding`` objects (ids + offsets) for a fast tokenizer; ``None`` each for a slow one."""
    backend = _backend(tokenizer)
    if backend is None:
        return [None] * len(texts)
    return backend.encode_batch(texts, add_special_tokens=False)


def _tokenize_ids(tokenizer, texts: list) -> list:
    backend = _backend(tokenizer)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [tokenizer.encode(t, add_special_tokens=False) if t else [] for t in texts]


def _label_whole(enc, r: Rendered):
    """(ids, labels) from one tokenization of the whole text, or None if a span boundary splits a token."""
    ids = enc.ids
    n = len(ids)
    labels = [IGNORE_INDEX] * n
    pos = 0
    spans = []
    for text, trained in r.segments:
        if trained:
            if spans and spans[-1][1] == pos:
                spans[-1][1] = pos + len(text)
            else:
                spans.append([pos, pos + len(text)])
        pos += len(text)
    total = pos
    for start, stop in spans:
        first = _token_at(enc, start, total, n)
        last = _token_at(enc, stop, total, n)
        if first is None or last is None:
            return None
        labels[first:last] = ids[first:last]
    return ids, labels


def _token_at(enc, char: int, total: int, n: int) -> Optional[int]:
    """Index of the token starting exactly at ``char`` (``n`` at the end of the text), else None."""
    if char >= total:
        return n
    k = enc.char_to_token(char)
    if k is None or (char > 0 and enc.char_to_token(char - 1) == k):
        return None  # the character before belongs to the same token: the boundary splits it
    return k
