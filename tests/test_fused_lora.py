"""The fused LoRA projection computes peft's function: same values and gradients, its dropout a fair coin."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from ftmagic.engine.fused_lora import (draw_dropout_bits, dropout_threshold, fusable, fused_lora, keep_scale)


def _model(dropout=0.0, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                        **lora)
    return get_peft_model(base, config).train()


def _step(model, fused: bool, seed: int = 1):
    ids = torch.randint(0, 53, (2, 11), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(seed)
    model.zero_grad()
    if fused:
        with fused_lora(model):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
    else:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_same_loss_and_gradients_as_peft_without_dropout():
    model = _model()
    ref_loss, ref_grads = _step(model, fused=False)
    loss, grads = _step(model, fused=True)
    assert torch.allclose(loss, ref_loss, atol=1e-6, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7 * 2
    for name in grads:
        assert torch.allclose(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4), name


def _projection(p: float):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(24, 40, bias=True))
    model = get_peft_model(net, LoraConfig(r=3, lora_alpha=6, lora_dropout=p, target_modules=["0"],
                                           init_lora_weights=False)).train()
    return model, model.base_model.model[0]


def test_dropout_equals_peft_math_with_the_same_mask():
    p = 0.3
    model, layer = _projection(p)
    x = torch.randn(5, 7, 24, requires_grad=True)
    torch.manual_seed(11)
    with fused_lora(model):
        y = model(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    fused = (x.grad.clone(), layer.lora_A["default"].weight.grad.clone(), layer.lora_B["default"].weight.grad.clone())

    torch.manual_seed(11)  # the same draws, applied by hand through peft's own formula
    mask = (draw_dropout_bits((35, 24), "cpu") >= dropout_threshold(p)).float().view(5, 7, 24)
    x.grad = None
    model.zero_grad()
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    ref = layer.base_layer(x) + b(a(x * mask * keep_scale(p))) * layer.scaling["default"]
    assert torch.allclose(y, ref, atol=1e-5)
    ref.backward(dy)
    for got, want in zip(fused, (x.grad, a.weight.grad, b.weight.grad)):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_dropout_keeps_each_element_with_probability_one_minus_p(p):
    torch.manual_seed(0)
    n = 1 << 22
    bits = draw_dropout_bits((n,), "cpu")
    kept = (bits >= dropout_threshold(p)).double().mean().item()
    assert abs(kept - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n) + 1 / 65536
    # Every 16-bit lane is uniform, including the top one of each 64-bit draw.
    lanes = (bits.view(-1, 4) >= dropout_threshold(p)).double().mean(0)
    assert (lanes - (1 - p)).abs().max().item() < 4 * math.sqrt(p * (1 - p) / (n / 4))
    assert keep_scale(p) * (1 - (round(p * 65536) / 65536)) == pytest.approx(1.0)


def test_gradient_checkpointing_recomputes_the_same_masks():
    plain = _model(dropout=0.2)
    _, want = _step(plain, fused=True, seed=5)
    checkpointed = _model(dropout=0.2)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed.enable_input_require_grads()
    _, got = _step(checkpointed, fused=True, seed=5)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6, rtol=1e-4), name


def test_bf16_autocast_matches_peft_under_autocast():
    model = _model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grads = _step(model, fused=False)
        loss, grads = _step(model, fused=True)
    assert abs(loss.item() - ref_loss.item()) < 0.02 * abs(ref_loss.item())
    for name in grads:
        assert grads[name].dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(grads[name].flatten(), ref_grads[name].flatten(), dim=0)
        assert cos > 0.99, name


def test_other_adapters_keep_peft_forward_and_context_restores():
    dora = _model(use_dora=True)
    assert not any(fusable(m) for m in dora.modules())
    model = _model()
    layers = [m for m in model.modules() if fusable(m)]
    assert len(layers) == 14
    with fused_lora(model):
        assert all("forward" in vars(m) for m in layers)
        model.disable_adapter_layers()  # switched off inside: peft's own forward answers
        ids = torch.tensor([[1, 2, 3]])
        off = model(input_ids=ids).logits
        model.enable_adapter_layers()
    assert not any("forward" in vars(m) for m in layers)
    with model.disable_adapter():
        assert torch.allclose(off, model(input_ids=ids).logits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_on_cuda_under_autocast_it_matches_peft(dtype):
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 needs compute capability 8.0")
    model = _model().cuda()
    with torch.autocast("cuda", dtype=dtype):
        ref_loss, ref_grads = _step_on(model, fused=False)
        loss, grads = _step_on(model, fused=True)
    assert abs(loss.item() - ref_loss.item()) < 0.02 * abs(ref_loss.item())
    for name in grads:
        cos = torch.nn.functional.cosine_similarity(grads[name].flatten().float(), ref_grads[name].flatten().float(),
                                                    dim=0)
        assert grads[name].dtype == torch.float32 and cos > 0.99, name
    # The dropout draws run on the GPU too, at the asked rate.
    torch.manual_seed(0)
    bits = draw_dropout_bits((1 << 20,), "cuda")
    assert abs((bits >= dropout_threshold(0.1)).float().mean().item() - 0.9) < 0.002


def _step_on(model, fused: bool):
    ids = torch.randint(0, 53, (2, 11), generator=torch.Generator().manual_seed(3)).cuda()
    torch.manual_seed(1)
    model.zero_grad()
    with fused_lora(model) if fused else contextlib.nullcontext():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
