"""The Ollama Modelfile: its Go template renders what the training template renders.

The Go templates are rendered with a small renderer of the text/template subset they use
(tests/gotemplate.py) and compared with the Jinja rendering that training used, for every
named template, with and without a system prompt, one turn and several.
"""

import pytest
from gotemplate import render_go
from transformers import AutoTokenizer

from ftmagic.data import render_prompt
from ftmagic.data.templates import NAMED_TEMPLATES, ChatTemplate, resolve_template
from ftmagic.errors import ExportError
from ftmagic.export.ollama import (GO_TEMPLATES, modelfile, named_equivalent, ollama_create_command,
                                   ollama_model_name)

CONVERSATIONS = [
    [{"role": "user", "content": "reverse: lamp"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "reverse: stone"}],
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "olleh"},
     {"role": "user", "content": "and world?\nTwo lines."}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
     {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}, {"role": "user", "content": "u3"}],
]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from ftmagic.constants import TINY_MODEL_DIR as TINY_DIR

    return AutoTokenizer.from_pretrained(str(TINY_DIR))


def ollama_render(template: str, conversation: list, system=None) -> str:
    """What Ollama renders: the Modelfile's SYSTEM first when the chat has no system message."""
    messages = list(conversation)
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return render_go(template, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})


def test_every_named_template_has_a_go_translation():
    assert set(GO_TEMPLATES) == set(NAMED_TEMPLATES)


@pytest.mark.parametrize("name", sorted(NAMED_TEMPLATES))
@pytest.mark.parametrize("system", [None, "Reply with the reversed word only."])
def test_go_template_renders_the_training_prompt(tiny_tokenizer, name, system):
    for conversation in CONVERSATIONS:
        trained = render_prompt(tiny_tokenizer, conversation, template=name, system_prompt=system)
        assert ollama_render(GO_TEMPLATES[name], conversation, system) == trained, (name, conversation)


def test_go_renderer_is_strict_about_what_it_does_not_know():
    with pytest.raises(ValueError):
        render_go("{{ printf \"%s\" .Content }}", {"Content": "x"})
    with pytest.raises(KeyError):
        render_go("{{ .Missing }}", {"Content": "x"})


def test_go_renderer_trims_like_text_template():
    assert render_go("a \n{{- .X }} \n b{{ .X -}}\n  c", {"X": "1"}) == "a1 \n b1c"


def test_a_tokenizer_template_equal_to_a_named_one_is_recognised(tiny_tokenizer):
    # The tiny model's own template is ChatML without BOS.
    assert named_equivalent(tiny_tokenizer, resolve_template(tiny_tokenizer)) == "chatml"
    assert named_equivalent(tiny_tokenizer, resolve_template(tiny_tokenizer, "alpaca")) == "alpaca"


def test_a_custom_template_without_translation_gets_none(tiny_tokenizer):
    custom = ChatTemplate("custom", "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}", "")
    assert named_equivalent(tiny_tokenizer, custom) is None
    text = modelfile("run-q8_0.gguf", go_template=None, stops=["<|im_end|>"], untranslated="custom")
    assert not any(line.startswith("TEMPLATE") for line in text.splitlines())
    assert "has no Ollama translation" in text


def test_modelfile_lines():
    text = modelfile("run-q8_0.gguf", go_template=GO_TEMPLATES["chatml"], stops=["<|im_end|>", '<say "x">'],
                     system="Be brief.", run_name="run")
    lines = text.splitlines()
    assert "FROM ./run-q8_0.gguf" in lines
    assert f'TEMPLATE """{GO_TEMPLATES["chatml"]}"""' in text
    assert 'SYSTEM """Be brief."""' in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert 'PARAMETER stop "<say \\"x\\">"' in lines
    assert "SYSTEM" not in modelfile("a.gguf", go_template=None, stops=[])


def test_modelfile_refuses_what_it_cannot_quote():
    with pytest.raises(ExportError, match="cannot quote"):
        modelfile("a.gguf", go_template=None, stops=[], system='say """hi"""')


def test_ollama_names_and_command():
    assert ollama_model_name("My Run (v2)") == "my-run-v2"
    assert ollama_model_name("___") == "ftmagic-model"
    assert ollama_create_command("rev", "/runs/my run/Modelfile") == "ollama create rev -f '/runs/my run/Modelfile'"
