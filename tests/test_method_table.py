"""The method table has one home: config, memory calculator and engine agree on every method.

For each method on small models built from configs, the memory calculator's
trainable-parameter count (from the config alone, no torch) equals what the engine's
preparer really leaves trainable.
"""

from __future__ import annotations

import typing
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from ftmagic.config import FORMATS, FinetuneConfig, _FIELD_TYPES  # noqa: E402
from ftmagic.engine.methods import PREPARERS, get_method  # noqa: E402
from ftmagic.memory import count_params  # noqa: E402
from ftmagic.memory.architectures import shape_from_hf_config  # noqa: E402
from ftmagic.methods import METHOD_NAMES, METHODS, get_method_spec, select_targets  # noqa: E402

SETTINGS = SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, target_modules="auto", num_virtual_tokens=3,
                           trainable_layers=1)

ARCHITECTURES = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False),
    "llama-biased": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=96, attention_bias=True,
                         mlp_bias=True, tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=96, tie_word_embeddings=True),
}


def _build(values: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(values)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def _engine_trainable(values: dict, method: str) -> int:
    spec = get_method_spec(method)
    # 4-bit loading needs real weights on disk; what QLoRA trains is LoRA's adapters on the same linears.
    model = get_method("lora" if spec.quantized else method).prepare(_build(values), SETTINGS)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_engine_registry_and_table_name_the_same_methods():
    assert set(PREPARERS) == set(METHODS)
    assert typing.get_args(_FIELD_TYPES["method"]) == METHOD_NAMES


def test_config_formats_are_the_data_layers_formats():
    from ftmagic.data.formats import FORMAT_NAMES

    assert set(FORMATS) == {"auto", *FORMAT_NAMES}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_calculator_counts_what_the_engine_trains(arch, method):
    values = ARCHITECTURES[arch]
    shape = shape_from_hf_config(values, name=arch)
    if get_method_spec(method).trains == "biases" and not shape.bias_params_per_layer:
        pytest.skip(f"{arch} has no biases: both the calculator and the engine refuse bitfit (tested below)")
    predicted = count_params(shape, method, lora_r=SETTINGS.lora_r, target_modules=SETTINGS.target_modules,
                             num_virtual_tokens=SETTINGS.num_virtual_tokens,
                             trainable_layers=SETTINGS.trainable_layers)["trainable"]
    assert predicted == _engine_trainable(values, method)


def test_bitfit_on_a_bias_free_model_is_refused_by_both():
    from ftmagic.errors import ModelError

    values = ARCHITECTURES["llama"]
    with pytest.raises(ModelError, match="has none"):
        count_params(shape_from_hf_config(values, name="llama"), "bitfit")
    with pytest.raises(ModelError, match="has none"):
        _engine_trainable(values, "bitfit")


def test_ia3_adapts_keys_values_and_the_mlp_down_projection():
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert select_targets(get_method_spec("ia3"), names, "auto") == ["k_proj", "v_proj", "down_proj"]
    assert select_targets(get_method_spec("lora"), names, "auto") == names


def test_packing_refusal_comes_from_the_table():
    for name, spec in METHODS.items():
        if spec.packable:
            assert FinetuneConfig(method=name, packing=True).packing
        else:
            with pytest.raises(Exception, match="cannot be used with"):
                FinetuneConfig.from_dict({"method": name, "packing": True})
