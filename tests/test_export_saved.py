"""A saved run is self-describing: plain transformers reproduces RunResult.generate token for token.

For each named template, a custom Jinja template and the tokenizer's own, a short run is
trained on a copy of the tiny model whose EOS (``<|endoftext|>``) differs from ChatML's
end-of-turn token (``<|im_end|>``). The saved folder alone (AutoTokenizer's
``apply_chat_template`` + ``generate`` with the folder's generation config, no ftmagic
code) must then give exactly the tokens ``RunResult.generate_ids`` gives, for several
conversations, and the merged model must too.
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import ftmagic
from ftmagic.data import render_prompt
from ftmagic.data.portable import answer_end_ids, end_of_turn, portable_template
from ftmagic.data.templates import NAMED_TEMPLATES, resolve_template
from ftmagic.demo import demo_dataset

CUSTOM = ("{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "reverse: lamp"}],
    [{"role": "user", "content": "reverse: stone"}],
    [{"role": "system", "content": "Reverse the word."}, {"role": "user", "content": "reverse: music"}],
    [{"role": "user", "content": "reverse: kite"}, {"role": "assistant", "content": "etik"},
     {"role": "user", "content": "reverse: bread"}],
]
# (template, system prompt of the run): every named template, a custom one, the tokenizer's own.
CASES = [(name, None) for name in sorted(NAMED_TEMPLATES)] + [("chatml", "Answer with the reversed word."),
                                                              ("alpaca", "Answer with the reversed word."),
                                                              (CUSTOM, None), (None, None)]


def _case_id(case):
    template, system = case
    name = "custom" if template == CUSTOM else template or "tokenizer"
    return name + ("+system" if system else "")


@pytest.fixture(scope="module", params=CASES, ids=_case_id)
def short_run(request, tiny_eos_variant, tmp_path_factory):
    template, system = request.param
    out = tmp_path_factory.mktemp("saved") / "run"
    return ftmagic.finetune(model=tiny_eos_variant, data=demo_dataset("train", n=96), template=template,
                            system_prompt=system, method="lora", lora_r=8, lr=3e-3, max_steps=6, batch_size=16,
                            max_seq_len=256, eval_steps=0, save_steps=0, seed=0, output_dir=str(out))


def plain_transformers_answer(folder, conversation, max_new_tokens=16):
    """Only transformers (and peft behind it for an adapter folder): no ftmagic code."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    generation = GenerationConfig.from_pretrained(folder)
    inputs = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, generation_config=generation, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_saved_folder_describes_the_training_template_and_end_tokens(short_run):
    folder = short_run.output_dir
    saved = AutoTokenizer.from_pretrained(folder)
    training = short_run.tokenizer  # the tokenizer the run trained with (the base model's)
    for conversation in CONVERSATIONS:
        trained = render_prompt(training, conversation, template=short_run.config.template,
                                system_prompt=short_run.config.system_prompt)
        plain = saved.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert plain == trained
    ends = json.loads(Path(folder, "generation_config.json").read_text())["eos_token_id"]
    ends = ends if isinstance(ends, list) else [ends]
    assert ends == short_run.end_token_ids()  # one home: the file holds what generation uses
    assert ends[0] == training.eos_token_id
    if short_run.config.template in ("chatml", CUSTOM, None):
        # ChatML and the custom template close a turn with <|im_end|>, which is not EOS here.
        assert ends == [training.eos_token_id, training.convert_tokens_to_ids("<|im_end|>")]
    else:
        assert ends == [training.eos_token_id]


def test_plain_transformers_generates_the_same_tokens(short_run):
    for conversation in CONVERSATIONS:
        ours = short_run.generate_ids(conversation, max_new_tokens=16)
        assert plain_transformers_answer(short_run.output_dir, conversation) == ours


def test_reloaded_run_and_merged_model_generate_the_same_tokens(short_run):
    again = ftmagic.RunResult.load(short_run.output_dir)
    summary = again.export("merged")
    merged = summary.paths("merged")[0]
    for conversation in CONVERSATIONS[:2]:
        ours = short_run.generate_ids(conversation, max_new_tokens=16)
        assert again.generate_ids(conversation, max_new_tokens=16) == ours
        assert plain_transformers_answer(merged, conversation) == ours


def test_generation_stops_at_the_end_of_turn_token(tiny_eos_variant, tmp_path):
    """Trained with ChatML on a tokenizer whose EOS is not <|im_end|>: answers end at <|im_end|>."""
    run = ftmagic.finetune(model=tiny_eos_variant, data=demo_dataset("train", n=320), template="chatml",
                           method="lora", lora_r=8, lr=3e-3, max_steps=40, batch_size=16, max_seq_len=96,
                           eval_steps=0, save_steps=0, seed=0, output_dir=str(tmp_path / "run"))
    im_end = run.tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers = [run.generate_ids(p, max_new_tokens=16) for p in ["reverse: lamp", "reverse: stone", "reverse: kite"]]
    assert any(a and a[-1] == im_end for a in answers), answers
    for answer in answers:
        assert run.tokenizer.eos_token_id not in answer  # it stopped before the EOS that training appended


def test_portable_template_bakes_variables_and_system_prompt():
    from ftmagic.constants import TINY_MODEL_DIR as TINY_DIR

    tok = AutoTokenizer.from_pretrained(str(TINY_DIR))
    source = portable_template(tok, resolve_template(tok, "chatml"), system_prompt='Say "hi".')
    assert source.startswith('{%- set bos_token = "" %}')
    text = tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template=source, tokenize=False,
                                   add_generation_prompt=True)
    assert text.startswith('<|im_start|>system\nSay "hi".<|im_end|>\n<|im_start|>user\nx')
    assert end_of_turn(tok, resolve_template(tok, "chatml")) == "<|im_end|>"
    assert end_of_turn(tok, resolve_template(tok, "alpaca")) is None
    assert answer_end_ids(tok, resolve_template(tok, "plain")) == [tok.eos_token_id]
