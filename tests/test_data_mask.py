"""Loss masks: the exact trained token positions for each format, EOS at the end of answers, truncation.

Expected positions are computed from hand-written ChatML strings tokenized directly, not
from the encoder under test.
"""

import pytest

from ftmagic.constants import IGNORE_INDEX as IGNORE
from ftmagic.data import encode_conversations, encode_example, encode_prompt, render_prompt
from ftmagic.errors import DataError


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def expected(tok, pieces):
    """Token ids and labels from (text, trained) pieces, tokenizing the joined text once."""
    all_ids = ids(tok, "".join(t for t, _ in pieces))
    labels, prefix = [], ""
    for text, trained in pieces:
        start, end = len(ids(tok, prefix)), len(ids(tok, prefix + text))
        labels.extend(all_ids[start:end] if trained else [IGNORE] * (end - start))
        prefix += text
    assert len(labels) == len(all_ids)
    return all_ids, labels


def trained_positions(labels):
    return [i for i, label in enumerate(labels) if label != IGNORE]


def im(role, content):
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def test_prompt_completion_mask(test_tokenizer):
    tok = test_tokenizer
    enc = encode_example(tok, {"prompt": "reverse: hello", "completion": "olleh"})
    prompt = "<|im_start|>user\nreverse: hello<|im_end|>\n<|im_start|>assistant\n"
    n = len(ids(tok, prompt))
    answer = ids(tok, "olleh<|im_end|>")
    assert enc.input_ids == ids(tok, prompt + "olleh<|im_end|>\n")
    assert trained_positions(enc.labels) == list(range(n, n + len(answer)))
    assert [enc.labels[i] for i in trained_positions(enc.labels)] == answer
    assert enc.labels[n + len(answer) - 1] == tok.eos_token_id  # the answer ends with EOS
    assert enc.labels[-1] == IGNORE  # the newline after EOS is not trained


def test_alpaca_mask_matches_hand_built(test_tokenizer):
    tok = test_tokenizer
    enc = encode_example(tok, {"instruction": "Add", "input": "1 2", "output": "3"})
    want_ids, want_labels = expected(tok, [(im("user", "Add\n\n1 2") + "<|im_start|>assistant\n", False),
                                           ("3<|im_end|>", True), ("\n", False)])
    assert (enc.input_ids, enc.labels) == (want_ids, want_labels)


def test_sharegpt_multi_turn_every_assistant_turn_trained(test_tokenizer):
    tok = test_tokenizer
    rec = {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "hi"},
                             {"from": "gpt", "value": "hello"}, {"from": "human", "value": "bye"},
                             {"from": "gpt", "value": "see you"}]}
    enc = encode_example(tok, rec)
    want_ids, want_labels = expected(tok, [
        (im("system", "Be kind.") + im("user", "hi") + "<|im_start|>assistant\n", False), ("hello<|im_end|>", True),
        ("\n" + im("user", "bye") + "<|im_start|>assistant\n", False), ("see you<|im_end|>", True), ("\n", False)])
    assert enc.input_ids == want_ids
    assert enc.labels == want_labels
    decoded = [tok.decode([i]) for i in enc.labels if i != IGNORE]
    assert "".join(decoded) == "hello<|im_end|>see you<|im_end|>"
    assert enc.text.startswith("<|im_start|>system\nBe kind.<|im_end|>")  # the system prompt is kept


def test_messages_weight_zero_turn_not_trained(test_tokenizer):
    tok = test_tokenizer
    rec = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0},
                        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    enc = encode_example(tok, rec)
    want_ids, want_labels = expected(tok, [
        (im("user", "a") + "<|im_start|>assistant\nb<|im_end|>\n" + im("user", "c") + "<|im_start|>assistant\n", False),
        ("d<|im_end|>", True), ("\n", False)])
    assert (enc.input_ids, enc.labels) == (want_ids, want_labels)


def test_text_format_trains_every_token_and_ends_with_eos(test_tokenizer):
    tok = test_tokenizer
    enc = encode_example(tok, {"text": "the quick brown fox"})
    assert enc.input_ids == ids(tok, "the quick brown fox<|im_end|>")
    assert enc.labels == enc.input_ids
    assert enc.input_ids[-1] == tok.eos_token_id


def test_train_on_all(test_tokenizer):
    tok = test_tokenizer
    enc = encode_example(tok, {"prompt": "p", "completion": "c"}, train_on="all")
    assert enc.labels == enc.input_ids == ids(tok, im("user", "p") + im("assistant", "c"))


def test_system_prompt_config_is_rendered_and_not_trained(test_tokenizer):
    tok = test_tokenizer
    enc = encode_example(tok, {"prompt": "p", "completion": "c"}, system_prompt="S")
    want_ids, want_labels = expected(tok, [(im("system", "S") + im("user", "p") + "<|im_start|>assistant\n", False),
                                           ("c<|im_end|>", True), ("\n", False)])
    assert (enc.input_ids, enc.labels) == (want_ids, want_labels)


@pytest.mark.parametrize("name, prompt_text, after", [
    ("alpaca", "Below is an instruction that describes a task. Write a response that appropriately completes the "
               "request.\n\n### Instruction:\nq\n\n### Response:\n", "\n\n"),
    ("plain", "q\n", "\n"),
    ("chatml", "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n", "\n"),
    ("llama3", "<|start_header_id|>user<|end_header_id|>\n\nq<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", ""),
])
def test_named_templates_and_eos_appended(test_tokenizer, name, prompt_text, after):
    tok = test_tokenizer
    enc = encode_example(tok, {"prompt": "q", "completion": "a"}, template=name)
    answer = {"llama3": "a<|eot_id|><|im_end|>"}.get(name, "a<|im_end|>")
    want_ids, want_labels = expected(tok, [(prompt_text, False), (answer, True), (after, False)])
    assert (enc.input_ids, enc.labels) == (want_ids, want_labels)
    assert enc.eos_added is (name != "chatml")  # chatml's <|im_end|> is this tokenizer's EOS
    assert render_prompt(tok, "q", template=name) == prompt_text


def test_template_without_eos_gets_eos_appended(test_tokenizer):
    tok = test_tokenizer
    jinja = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    enc = encode_example(tok, {"prompt": "q", "completion": "a"}, template=jinja)
    assert enc.text == "user: q\nassistant: a<|im_end|>\n"
    assert enc.eos_added
    trained = [i for i in enc.labels if i != IGNORE]
    assert trained[-1] == tok.eos_token_id
    assert tok.decode(trained) == tok.decode(ids(tok, "a<|im_end|>")) or tok.decode(trained).endswith("a<|im_end|>")


def test_straddling_token_falls_back_to_segments(test_tokenizer):
    # "A: " + "hello": byte-level BPE glues the space to the answer, so the boundary splits a token.
    tok = test_tokenizer
    jinja = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'Q: ' + m['content'] + '\\n' }}"
             "{% else %}{{ 'A: ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}")
    enc = encode_example(tok, {"prompt": "hi", "completion": "hello"}, template=jinja)
    assert enc.method == "prefix+segments"
    prompt_ids = ids(tok, "Q: hi\nA: ")
    assert enc.input_ids[:len(prompt_ids)] == prompt_ids == encode_prompt(tok, "hi", template=jinja)
    assert enc.labels == [IGNORE] * len(prompt_ids) + ids(tok, "hello<|im_end|>") + [IGNORE] * len(ids(tok, "\n"))


def test_non_prefix_template_uses_search(test_tokenizer):
    tok = test_tokenizer
    # Writes a closing marker only after the last message: earlier renderings are not prefixes.
    jinja = ("{% for m in messages %}{{ m['role'] + ':\\n' + m['content'] + '<|im_end|>' }}{% endfor %}"
             "{% if not add_generation_prompt %}{{ '[end]' }}{% endif %}"
             "{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}")
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    enc = encode_example(tok, conv, template=jinja)
    assert enc.method == "search"
    want_ids, want_labels = expected(tok, [("user:\na<|im_end|>assistant:\n", False), ("b<|im_end|>", True),
                                           ("user:\nc<|im_end|>assistant:\n", False), ("d<|im_end|>", True), ("[end]", False)])
    assert (enc.input_ids, enc.labels) == (want_ids, want_labels)


def test_template_error_is_reported(test_tokenizer):
    jinja = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('needs a system prompt') }}{% endif %}x"
    with pytest.raises(DataError, match=r"record: the chat template rejects this conversation \(needs a system prompt\)"):
        encode_example(test_tokenizer, {"prompt": "q", "completion": "a"}, template=jinja)


def test_truncation_counted_and_no_trained_tokens(test_tokenizer):
    tok = test_tokenizer
    convs = [[{"role": "user", "content": "short"}, {"role": "assistant", "content": "ok", "weight": 1}],
             [{"role": "user", "content": "a much longer question " * 5}, {"role": "assistant", "content": "ok", "weight": 1}]]
    short_len = len(ids(tok, im("user", "short") + im("assistant", "ok")))
    results = encode_conversations(tok, convs, max_seq_len=short_len)
    assert [r.truncated for r in results] == [False, True]
    assert len(results[1].input_ids) == short_len and results[1].length > short_len
    assert results[1].trained_tokens == 0  # the answer was cut away entirely
    assert results[0].trained_tokens == len(ids(tok, "ok<|im_end|>"))


def test_render_prompt_with_history_and_encode_prompt(test_tokenizer):
    tok = test_tokenizer
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    text = render_prompt(tok, history, system_prompt="S")
    assert text == im("system", "S") + im("user", "a") + im("assistant", "b") + im("user", "c") + "<|im_start|>assistant\n"
    assert encode_prompt(tok, "c") == ids(tok, im("user", "c") + "<|im_start|>assistant\n")


def test_fast_path_equals_tokenizer_call(test_tokenizer):
    tok = test_tokenizer
    enc = encode_example(tok, {"prompt": "héllo wörld ✓", "completion": "ünïcode ✓"})
    assert enc.input_ids == ids(tok, enc.text)
    assert enc.method == "prefix"


@pytest.fixture(scope="module")
def metaspace_tokenizer():
    """A SentencePiece-style tokenizer (Metaspace, BOS added to plain text) with a Llama-2-like template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from model_builders import _CORPUS

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    core.train_from_iterator(_CORPUS * 20, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                         "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}"
                         "{% endif %}{% endfor %}")
    return tok


def test_text_format_with_bos_adding_tokenizer(metaspace_tokenizer):
    tok = metaspace_tokenizer
    enc = encode_example(tok, {"text": "hello world"})
    assert enc.input_ids == tok("hello world")["input_ids"] + [tok.eos_token_id]  # as the tokenizer does it alone
    assert enc.labels == [IGNORE] + enc.input_ids[1:]


def test_template_with_eos_in_template_and_space_before_answer(metaspace_tokenizer):
    tok = metaspace_tokenizer
    enc = encode_example(tok, {"prompt": "reverse hello", "completion": "olleh world"})
    prompt_ids = encode_prompt(tok, "reverse hello")
    assert render_prompt(tok, "reverse hello") == "<s>[INST] reverse hello [/INST]"
    assert enc.input_ids[:len(prompt_ids)] == prompt_ids  # generation starts from the same tokens
    assert enc.labels == [IGNORE] * len(prompt_ids) + enc.input_ids[len(prompt_ids):]
    assert tok.decode([i for i in enc.labels if i != IGNORE]).endswith("world</s>")
    assert not enc.eos_added


def test_template_refusing_partial_conversations_falls_back_to_search(test_tokenizer):
    tok = test_tokenizer
    jinja = ("{% if messages[-1]['role'] != 'assistant' %}{{ raise_exception('must end with an answer') }}{% endif %}"
             "{% for m in messages %}{{ m['role'] + ':\\n' + m['content'] + '<|im_end|>' }}{% endfor %}")
    enc = encode_example(tok, {"prompt": "q", "completion": "a"}, template=jinja)
    assert enc.method == "search"
    want_ids, want_labels = expected(tok, [("user:\nq<|im_end|>assistant:\n", False), ("a<|im_end|>", True)])
    assert (enc.input_ids, enc.labels) == (want_ids, want_labels)


def test_template_that_rewrites_history_like_reasoning_models(test_tokenizer):
    # Like Qwen3: only the last assistant turn carries an (empty) reasoning block.
    tok = test_tokenizer
    jinja = ("{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}"
             "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}"
             "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    single = encode_example(tok, {"prompt": "q", "completion": "a"}, template=jinja)
    assert single.method == "prefix"  # the empty reasoning block belongs to the trained answer
    assert tok.decode([i for i in single.labels if i != IGNORE]) == "<think>\n\n</think>\n\na<|im_end|>"
    conv = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    multi = encode_example(tok, conv, template=jinja)
    assert multi.method == "search"  # an earlier turn renders differently once it is not the last
    assert tok.decode([i for i in multi.labels if i != IGNORE]) == "a1<|im_end|>a2<|im_end|>"
    assert multi.text == tok.apply_chat_template(conv, chat_template=jinja, tokenize=False)
