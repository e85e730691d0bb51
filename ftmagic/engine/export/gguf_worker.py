"""Child process that runs llama.cpp's converter or quantizer (``python -m ...gguf_worker``).

A process of its own because llama.cpp's converter imports its own copy of the ``gguf``
package and configures logging globally, and because the quantizer is C code that aborts
the whole process on a failed assertion: neither should happen inside a user's kernel.

``convert`` runs ``convert_hf_to_gguf.py``'s model class with two additions, both only
where the converter itself gives up or stays silent:

* A BPE tokenizer whose pre-tokenizer the converter does not know by hash. When the
  tokenizer has no merges (every token is one byte, like the embedded tiny model's), how
  text is split before BPE cannot change a single token, so llama.cpp's ``default``
  pre-tokenizer is exact. GGUF cannot hold an empty merge list (gguf-py refuses empty
  arrays) while llama.cpp requires the key, so one merge of two control tokens is
  written: BPE never sees control tokens (they are split off first), so it never applies.
  A tokenizer with merges and GPT-2's own byte-level split maps to ``gpt-2``. Anything
  else stops with the converter's own advice.
* The metadata a runtime needs to stop and to prompt like training: the end-of-turn id
  (``tokenizer.ggml.eot_token_id``) and whether to add BOS, when the converter found none.

``quantize`` calls ``llama_model_quantize`` from llama-cpp-python.

Failures a user can act on end with one line ``FTMAGIC-ERROR: <message>`` on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ERROR_PREFIX = "FTMAGIC-ERROR: "
MERGES_KEY = "tokenizer.ggml.merges"


def fail(message: str) -> None:
    print(ERROR_PREFIX + message, file=sys.stderr, flush=True)
    raise SystemExit(3)


def fallback_pre_tokenizer(tokenizer_json: dict):
    """The llama.cpp pre-tokenizer that reproduces this tokenizer exactly, or None if unsure."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        return None
    if not model.get("merges"):
        return "default"  # single-byte tokens: splitting cannot change any token
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"  # GPT-2's byte-level split, which llama.cpp implements as `gpt-2`
    return None


def inert_merge(tokenizer_json: dict):
    """One merge of two control tokens: BPE never applies it (control tokens are split off first)."""
    specials = [t["content"] for t in tokenizer_json.get("added_tokens", [])
                if t.get("special") and " " not in t["content"]]
    return f"{specials[0]} {specials[1]}" if len(specials) >= 2 else None


def convert(args) -> None:
    converter = Path(args.converter)
    sys.path.insert(0, str(converter / "gguf-py"))
    sys.path.insert(0, str(converter))
    try:
        import torch

        import gguf  # noqa: F401 - llama.cpp's own copy, from the converter folder
        from conversion import ModelBase, ModelType, get_model_architecture, get_model_class
    except ImportError as exc:
        fail(f"llama.cpp's converter cannot start: {exc}; install its Python packages with "
             "`pip install 'ftmagic[gguf]'`")
    extra = json.loads(args.metadata)
    model_dir = Path(args.model)
    tokenizer_file = model_dir / "tokenizer.json"
    tokenizer_json = json.loads(tokenizer_file.read_text(encoding="utf-8")) if tokenizer_file.is_file() else {}

    hparams = ModelBase.load_hparams(model_dir, False)
    architecture = get_model_architecture(hparams, ModelType.TEXT)
    try:
        base_class = get_model_class(architecture)
    except NotImplementedError:
        fail(f"llama.cpp's converter does not support the architecture `{architecture}` of `{model_dir}`")

    class Model(base_class):  # type: ignore[misc, valid-type]
        model_arch = base_class.model_arch  # the converter requires each class to name its architecture

        def get_vocab_base_pre(self, tokenizer) -> str:
            try:
                return super().get_vocab_base_pre(tokenizer)
            except NotImplementedError:
                name = fallback_pre_tokenizer(tokenizer_json)
                if name is None:
                    fail(f"llama.cpp's converter does not recognise the pre-tokenizer of `{model_dir}`; a newer "
                         "llama.cpp may (see convert_hf_to_gguf_update.py in llama.cpp)")
                return name

        def set_vocab(self):
            super().set_vocab()
            kv = self.gguf_writer.kv_data[0]
            if kv.get("tokenizer.ggml.model") is not None and kv["tokenizer.ggml.model"].value == "gpt2" \
                    and MERGES_KEY not in kv:
                merge = inert_merge(tokenizer_json)
                if merge is None:
                    fail(f"the tokenizer of `{model_dir}` has no BPE merges and no two control tokens; "
                         "llama.cpp cannot load such a vocabulary")
                self.gguf_writer.add_token_merges([merge])
            if extra.get("eot_id") is not None and "tokenizer.ggml.eot_token_id" not in kv:
                self.gguf_writer.add_eot_token_id(int(extra["eot_id"]))
            if extra.get("add_bos") is not None and "tokenizer.ggml.add_bos_token" not in kv:
                self.gguf_writer.add_add_bos_token(bool(extra["add_bos"]))

    import gguf as gguf_module

    ftypes = {"f32": gguf_module.LlamaFileType.ALL_F32, "f16": gguf_module.LlamaFileType.MOSTLY_F16,
              "bf16": gguf_module.LlamaFileType.MOSTLY_BF16, "q8_0": gguf_module.LlamaFileType.MOSTLY_Q8_0}
    with torch.inference_mode():
        model = Model(model_dir, ftypes[args.outtype], Path(args.outfile), model_name=extra.get("name"))
        model.write()


def quantize(args) -> None:
    import ctypes

    try:
        import llama_cpp
    except ImportError as exc:
        fail(f"llama.cpp's quantizer is missing ({exc}); `pip install 'ftmagic[gguf]'` builds llama-cpp-python")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, args.ftype)
    params.nthread = int(args.threads)
    status = llama_cpp.llama_model_quantize(args.source.encode(), args.target.encode(), ctypes.byref(params))
    if status != 0:
        fail(f"llama.cpp's quantizer failed on `{args.source}` (status {status})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="gguf_worker")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert")
    c.add_argument("--converter", required=True)
    c.add_argument("--model", required=True)
    c.add_argument("--outfile", required=True)
    c.add_argument("--outtype", required=True, choices=("f32", "f16", "bf16", "q8_0"))
    c.add_argument("--metadata", default="{}")
    q = sub.add_parser("quantize")
    q.add_argument("source")
    q.add_argument("target")
    q.add_argument("ftype")
    q.add_argument("--threads", default="0")
    args = parser.parse_args(argv)
    (convert if args.command == "convert" else quantize)(args)


if __name__ == "__main__":
    main()
