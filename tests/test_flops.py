"""The FLOP count of a training step against torch's own operation counter on the engine's real step."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ftmagic.engine.fastpath import fast_loss, fast_step, flatten_batch
from ftmagic.errors import ConfigError
from ftmagic.flops import limit_share, training_flops
from ftmagic.memory.architectures import resolve_model

CONFIG = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
LENGTHS, PROMPTS = (9, 4, 15, 6), (3, 1, 5, 6)  # the last example has no trained token


def _model(method: str, targets=None):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG, attn_implementation="sdpa"))
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=targets or
                                                 ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"]))
    return model.train()


def _rows():
    g = torch.Generator().manual_seed(0)
    rows = []
    for n, p in zip(LENGTHS, PROMPTS):
        ids = torch.randint(3, CONFIG["vocab_size"], (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return rows


def _counted(model) -> tuple[int, int]:
    """(FLOPs torch counts for one fast step, forward and backward; labelled positions)."""
    batch = flatten_batch(_rows())
    labelled = int((batch["labels"] != -100).sum())
    # The math backend decomposes attention into matmuls that the counter sees (CPU flash is not counted).
    # The loss accumulates the output layer's weight gradient in place (addmm_), which torch's
    # table leaves out; it costs what addmm costs.
    inplace = {torch.ops.aten.addmm_: lambda acc, a, b, *args, **kwargs: 2 * a[0] * a[1] * b[1]}
    with FlopCounterMode(display=False, custom_mapping=inplace) as counter, sdpa_kernel(SDPBackend.MATH), fast_step(model):
        fast_loss(model, batch, reduction="sum").backward()
    return counter.get_total_flops(), labelled


@pytest.mark.parametrize("method", ["lora", "full"])
def test_count_equals_torch_flop_counter_on_the_fast_step(method):
    counted, labelled = _counted(_model(method))
    shape = resolve_model(CONFIG | {"model_type": "llama"})
    # The math backend computes every query-key pair, masked or not: dense, not causal.
    ours = training_flops(shape, LENGTHS, labelled, method=method, lora_r=4, causal=False)
    assert ours.total == counted


@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "down_proj"], ["down_proj"], ["o_proj", "up_proj"]])
def test_count_follows_where_gradients_flow(targets):
    # No gradient flows into the first block before its first adapted layer.
    counted, labelled = _counted(_model("lora", targets))
    shape = resolve_model(CONFIG | {"model_type": "llama"})
    assert training_flops(shape, LENGTHS, labelled, lora_r=4, target_modules=targets, causal=False).total == counted


def test_causal_attention_counts_only_attended_pairs():
    shape = resolve_model("llama-3.2-1b")
    dense = training_flops(shape, [100, 300], 200, causal=False)
    causal = training_flops(shape, [100, 300], 200, causal=True)
    assert dense.attention / causal.attention == pytest.approx((100**2 + 300**2) / (100 * 101 / 2 + 300 * 301 / 2))
    assert (dense.linears, dense.adapters, dense.head) == (causal.linears, causal.adapters, causal.head)


def test_flattened_examples_cost_less_attention_than_one_long_row():
    shape = resolve_model("llama-3.2-1b")
    assert training_flops(shape, [256] * 4, 500).attention < training_flops(shape, [1024], 500).attention / 3


def test_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="prompt_tuning"):
        training_flops(resolve_model("llama-3.2-1b"), [10], 5, method="prompt_tuning")


def test_limit_share():
    assert limit_share(500, 1e9, 1e12) == pytest.approx(0.5)
    assert limit_share(500, 1e9, 0) == 0.0
