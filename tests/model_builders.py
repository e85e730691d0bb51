"""Builders of the tests' small models: a tokenizer with a chat template and a tiny Llama.

A module of its own (not conftest.py) so test files can import it by a unique name.
Nothing here downloads anything; every model is built in a temporary folder.
"""

from __future__ import annotations

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "user assistant system instruction input output response question answer",
    "reverse the word hello world python tensor model data train test",
    "0 1 2 3 4 5 6 7 8 9 a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "Below is an instruction that describes a task. Write a response that completes the request.",
]


def build_test_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer with ChatML special tokens and chat template (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(_CORPUS * 20, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token=None, unk_token=None)
    tok.chat_template = CHATML_TEMPLATE
    return tok


def build_test_model_dir(path, tokenizer=None, **overrides):
    """Save a randomly initialised 2-layer Llama (about 60k parameters) and its tokenizer to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or build_test_tokenizer()
    settings = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    settings.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


# --------------------------------------------------------------------------- the architecture matrix
#
# One small tokenizer per family, with that family's special tokens and (a trimmed copy of)
# its chat template, and one tiny random-weight model per family with the features that
# make it differ from Llama: attention biases (Qwen2), q/k norms (Qwen3, Gemma 3), a sliding
# window (Mistral, Gemma 2 and 3, Phi-3; shorter than the memory test's rows, and narrowed
# below the examples' length by the fast-path test), soft-capped attention and logits
# (Gemma 2), fused projections (Phi-3), Conv1D layers, LayerNorm and learned positions (GPT-2).

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (  # the answer is followed by EOS written by the template itself
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported') }}{% endif %}{% endfor %}"
)
GEMMA_TEMPLATE = (  # no system role; the assistant is `model`; turns end with <end_of_turn>, not EOS
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
PHI3_TEMPLATE = (  # turns end with <|end|>; EOS only closes the whole conversation
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# family -> (special tokens, bos, eos, pad, whether plain text starts with BOS, chat template)
TOKENIZER_STYLES = {
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", None, True, LLAMA3_TEMPLATE),
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|endoftext|>", "<|endoftext|>", False,
               CHATML_TEMPLATE),  # a Qwen base model: EOS is <|endoftext|>, turns end with <|im_end|>
    "mistral": (["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", None, True, MISTRAL_TEMPLATE),
    "gemma": (["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<pad>", True,
              GEMMA_TEMPLATE),
    "phi3": (["<unk>", "<s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"], "<s>",
             "<|endoftext|>", "<|endoftext|>", False, PHI3_TEMPLATE),
    "gpt2": (["<|endoftext|>"], "<|endoftext|>", "<|endoftext|>", None, False, None),
}


def build_family_tokenizer(style: str, vocab_size: int = 320):
    """A byte-level BPE tokenizer with the special tokens, BOS rule and chat template of ``style``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials, bos, eos, pad, adds_bos, template = TOKENIZER_STYLES[style]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(_CORPUS * 20, trainer=trainer)
    if adds_bos:
        core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                            special_tokens=[(bos, core.token_to_id(bos))])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token=pad,
                                  unk_token="<unk>" if "<unk>" in specials else None)
    if template:
        tok.chat_template = template
    return tok


# family -> (tokenizer style, Hugging Face config of a tiny model with the family's features)
_BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
FAMILIES = {
    "llama": ("llama3", dict(_BASE, model_type="llama", tie_word_embeddings=True)),  # SmolLM2-style tied head
    "qwen2": ("chatml", dict(_BASE, model_type="qwen2", tie_word_embeddings=True)),  # q/k/v biases
    "qwen3": ("chatml", dict(_BASE, model_type="qwen3", head_dim=24, tie_word_embeddings=True)),  # q/k norms
    "mistral": ("mistral", dict(_BASE, model_type="mistral", sliding_window=32)),
    "gemma2": ("gemma", dict(_BASE, model_type="gemma2", head_dim=16, sliding_window=32, query_pre_attn_scalar=16,
                             final_logit_softcapping=30.0, attn_logit_softcapping=50.0)),
    "gemma3": ("gemma", dict(_BASE, model_type="gemma3_text", head_dim=16, sliding_window=32, query_pre_attn_scalar=16,
                             layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("phi3", dict(_BASE, model_type="phi3", sliding_window=32)),  # fused qkv and gate_up
    "gpt2": ("gpt2", dict(model_type="gpt2", n_embd=64, n_inner=96, n_layer=2, n_head=4, n_positions=256)),
}


def family_config(family: str, tokenizer, **overrides) -> dict:
    """The family's tiny config, with the vocabulary and special token ids of ``tokenizer``."""
    values = dict(FAMILIES[family][1], **overrides)
    values.update(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    return values


def build_family_model(family: str, tokenizer, **overrides):
    """A randomly initialised model of ``family`` (seeded, so every build is the same)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    values = family_config(family, tokenizer, **overrides)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def build_family_model_dir(path, family: str) -> str:
    """Save a tiny ``family`` model with its family-style tokenizer to ``path``; usable as `model:`."""
    tokenizer = build_family_tokenizer(FAMILIES[family][0])
    model = build_family_model(family, tokenizer)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


def build_test_encoder_dir(path):
    """Save a randomly initialised 2-layer BERT and a WordPiece tokenizer ([CLS] ... [SEP]) to ``path``."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    core = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    core.train_from_iterator(_CORPUS * 20, trainer=trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials,
                                                                              show_progress=False))
    cls, sep = core.token_to_id("[CLS]"), core.token_to_id("[SEP]")
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)
