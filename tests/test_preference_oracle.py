"""ftmagic's DPO, ORPO and reward losses against TRL's on fixed batches (within 1e-5), and the
tokens whose log-probabilities DPO sums: exactly the completions' (answer and EOS).

The same model, LoRA weights and token rows go to both; TRL's batches are built from
ftmagic's rows (its completion mask is where ftmagic's labels are not -100), so what is
compared is the loss, not two tokenisations.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

from ftmagic.config import FinetuneConfig  # noqa: E402
from ftmagic.constants import IGNORE_INDEX  # noqa: E402
from ftmagic.data import prepare_data  # noqa: E402
from ftmagic.engine.device import DevicePlan  # noqa: E402
from ftmagic.engine.logprobs import token_logprobs  # noqa: E402
from ftmagic.engine.preference import DPO, ORPO, pair_batch, sequence_logprobs  # noqa: E402
from ftmagic.engine.fastpath import varlen_attention  # noqa: E402

PLAN = DevicePlan(device="cpu", precision="fp32", use_grad_scaler=False, qlora_compute_dtype=None, method="lora",
                  reason="test")
PAIRS = [
    {"prompt": "reverse: hello", "chosen": "olleh", "rejected": "hello"},
    {"prompt": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "copy: data"}],
     "chosen": [{"role": "assistant", "content": "data"}], "rejected": [{"role": "assistant", "content": "the data is"}]},
    {"chosen": [{"role": "user", "content": "first letter: fox"}, {"role": "assistant", "content": "f"}],
     "rejected": [{"role": "user", "content": "first letter: fox"}, {"role": "assistant", "content": "x"}]},
    {"prompt": "quick test", "chosen": "a quick answer", "rejected": "no"},
]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _rows(tokenizer, objective="dpo"):
    return prepare_data(FinetuneConfig(data=PAIRS, objective=objective, max_seq_len=128), tokenizer).train


def _peft_model(model_dir, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM"))
    _perturb(model, seed)
    return model


def _perturb(model, seed):
    """Non-zero LoRA B weights, so the policy differs from the reference (the adapter-disabled base)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)


def _trl_batch(rows, pad_id):
    """TRL's DataCollatorForPreference output for ftmagic's rows: chosen first, then rejected, right-padded."""
    seqs = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    length = max(len(s["input_ids"]) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id)
    attention = torch.zeros((len(seqs), length), dtype=torch.long)
    completion = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s["input_ids"])
        ids[i, :n] = torch.tensor(s["input_ids"])
        attention[i, :n] = 1
        completion[i, :n] = torch.tensor([int(t != IGNORE_INDEX) for t in s["labels"]])
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_token_logprobs_match_full_log_softmax_values_and_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    scale = torch.randn(37)
    ours = token_logprobs(hidden, weight, targets, bias=bias, chunk_rows=8)
    (ours * scale).sum().backward()
    got = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    ref = torch.log_softmax(hidden @ weight.t() + bias, -1).gather(1, targets[:, None]).squeeze(1)
    (ref * scale).sum().backward()
    assert torch.allclose(ours, ref, atol=1e-5)
    for mine, theirs in zip(got, (hidden.grad, weight.grad, bias.grad)):
        assert torch.allclose(mine, theirs, atol=1e-5)


def test_token_logprobs_in_chunks_rounded_to_a_multiple_change_no_value_and_no_gradient(monkeypatch):
    import ftmagic.engine.logprobs as logprobs

    seen, real = [], logprobs._logits_block

    def spy(h, *args, **kwargs):
        seen.append(h.shape[0])
        return real(h, *args, **kwargs)

    monkeypatch.setattr(logprobs, "_logits_block", spy)
    torch.manual_seed(0)
    inputs = [torch.randn(37, 16), torch.randn(50, 16), torch.randn(50)]
    targets, scale = torch.randint(0, 50, (37,)), torch.randn(37)
    results = []
    for multiple in (1, 8):  # chunks of 10 become 8; 37 = 4 x 8 + 5 padded to 8
        leaves = [x.clone().requires_grad_() for x in inputs]  # the trained head: backward recomputes it
        values = token_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], chunk_rows=10, multiple=multiple)
        (values * scale).sum().backward()
        results.append((values.detach(), [leaf.grad for leaf in leaves]))
    assert seen[-10:] == [8] * 10  # forward and backward of the rounded run: every chunk 8 rows
    (plain, plain_grads), (rounded, rounded_grads) = results
    torch.testing.assert_close(rounded, plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(rounded_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_pair_batch_rounded_to_a_multiple_gives_the_same_log_probs_and_gradients(test_tokenizer, test_model_dir):
    rows, pad = _rows(test_tokenizer), test_tokenizer.pad_token_id
    model = _peft_model(test_model_dir)
    results = []
    for multiple in (1, 16):
        batch = pair_batch(rows, fast=True, pad_id=pad, multiple=multiple)
        with varlen_attention(model):
            values = sequence_logprobs(model, batch)
            (values * torch.arange(1.0, 9.0)).sum().backward()
        results.append((batch, values.detach(), _grads(model)))
        model.zero_grad(set_to_none=True)
    (plain, values, grads), (rounded, rounded_values, rounded_grads) = results
    length = plain["input_ids"].shape[1]
    assert length % 16 and rounded["input_ids"].shape[1] == length + (-length % 16)
    assert rounded["seq_bounds"][:-1] == plain["seq_bounds"]  # one more segment: the padding
    for key in ("last_index", "label_sequence", "label_index"):
        assert torch.equal(rounded[key], plain[key]), key
    torch.testing.assert_close(rounded_values, values, rtol=1e-5, atol=1e-5)
    assert grads.keys() == rounded_grads.keys()
    for name in grads:
        torch.testing.assert_close(rounded_grads[name], grads[name], rtol=1e-4, atol=1e-6)


def test_summed_log_probs_cover_exactly_the_completion_tokens(test_tokenizer, test_model_dir):
    rows = _rows(test_tokenizer)
    tok = test_tokenizer
    for row, record in zip(rows, PAIRS[:1]):
        trained = [t for t in row["chosen"]["labels"] if t != IGNORE_INDEX]
        assert tok.decode(trained) == "olleh" + tok.eos_token
        trained = [t for t in row["rejected"]["labels"] if t != IGNORE_INDEX]
        assert tok.decode(trained) == "hello" + tok.eos_token
    # The UltraFeedback-style record: its shared user turn is the prompt, only the answers are trained.
    third = rows[2]
    assert tok.decode([t for t in third["chosen"]["labels"] if t != IGNORE_INDEX]) == "f" + tok.eos_token
    assert "first letter: fox" in tok.decode(third["chosen"]["input_ids"])

    model = _peft_model(test_model_dir)
    fast = pair_batch(rows, fast=True)
    with torch.no_grad(), varlen_attention(model):
        ours = sequence_logprobs(model, fast)
    # By hand: full logits of each sequence alone, log-softmax, summed over the labelled tokens only.
    expected = []
    for seq in [r["chosen"] for r in rows] + [r["rejected"] for r in rows]:
        ids = torch.tensor([seq["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        expected.append(sum(float(logp[t - 1, tok_id]) for t, tok_id in enumerate(seq["labels"]) if tok_id != IGNORE_INDEX))
    assert torch.allclose(ours, torch.tensor(expected), atol=1e-4)
    with torch.no_grad():  # the padded path (models the fast path does not cover) gives the same sums
        padded = sequence_logprobs(model, pair_batch(rows, fast=False, pad_id=tok.pad_token_id))
    assert torch.allclose(padded, ours, atol=1e-4)


def _dpo_trainer(model_dir, tokenizer, tmp_path, loss_type, beta):
    from peft import LoraConfig
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss_type], report_to="none",
                     use_cpu=True, per_device_train_batch_size=4, max_length=None)
    dataset = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM"))
    _perturb(trainer.model, 0)
    return trainer


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("ipo", 0.5)])
def test_dpo_loss_and_gradients_equal_trl_dpo_trainer(test_tokenizer, test_model_dir, tmp_path, loss_type, beta):
    rows = _rows(test_tokenizer)
    trainer = _dpo_trainer(test_model_dir, test_tokenizer, tmp_path, loss_type, beta)
    model = trainer.model
    model.train()
    theirs = trainer._compute_loss(model, _trl_batch(rows, test_tokenizer.pad_token_id), return_outputs=False)
    theirs.backward()
    trl_grads = _grads(model)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    model.zero_grad(set_to_none=True)

    objective = DPO(model, pad_id=test_tokenizer.pad_token_id, plan=PLAN, beta=beta, loss_type=loss_type)
    assert objective.fast
    batch = objective.batch([dict(r) for r in rows])
    with objective.context(model):
        loss_sum, metrics = objective.loss(model, batch)
        (loss_sum / objective.units(batch)).backward()
    assert abs(float(loss_sum) / objective.units(batch) - float(theirs)) < 1e-5
    ours = _grads(model)
    assert ours.keys() == trl_grads.keys()
    for name in ours:
        assert torch.allclose(ours[name], trl_grads[name], atol=1e-5), name
    n = objective.units(batch)
    assert abs(float(metrics["reward_margin"]) / n - trl_metrics["rewards/margins"]) < 1e-5
    assert abs(float(metrics["reward_chosen"]) / n - trl_metrics["rewards/chosen"]) < 1e-5
    assert abs(float(metrics["accuracy"]) / n - trl_metrics["rewards/accuracies"]) < 1e-6


def test_dpo_reference_log_probs_are_computed_once_per_row(test_tokenizer, test_model_dir):
    rows = [dict(r) for r in _rows(test_tokenizer)]
    model = _peft_model(test_model_dir)
    objective = DPO(model, pad_id=test_tokenizer.pad_token_id, plan=PLAN)
    calls = []
    original = model.disable_adapter

    def counting():
        calls.append(1)
        return original()

    model.disable_adapter = counting
    batch = objective.batch(rows)
    with objective.context(model), torch.no_grad():
        first, _ = objective.loss(model, batch)
        second, _ = objective.loss(model, objective.batch(rows))
    assert len(calls) == 1 and torch.allclose(first, second)


def test_orpo_loss_equals_trl_odds_ratio_and_nll_on_the_completions(test_tokenizer, test_model_dir):
    from trl.experimental.orpo import ORPOTrainer

    rows = _rows(test_tokenizer, "orpo")
    model = _peft_model(test_model_dir, seed=1)
    lam = 0.25
    objective = ORPO(model, pad_id=test_tokenizer.pad_token_id, plan=PLAN, lam=lam)
    batch = objective.batch(rows)
    with objective.context(model), torch.no_grad():
        loss_sum, metrics = objective.loss(model, batch)

    # TRL: full logits of the padded batch, average completion log-probs, its odds-ratio loss.
    seqs = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    length = max(len(s["input_ids"]) for s in seqs)
    ids = torch.full((len(seqs), length), test_tokenizer.pad_token_id)
    labels = torch.full((len(seqs), length), IGNORE_INDEX)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s["input_ids"])] = torch.tensor(s["input_ids"])
        labels[i, :len(s["labels"])] = torch.tensor(s["labels"])
        mask[i, :len(s["input_ids"])] = 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    avg = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    n = len(rows)
    fake_self = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device="cpu"))
    losses, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(fake_self, avg[:n], avg[n:])
    # TRL's NLL is CrossEntropyLoss over the chosen rows; here its labels keep only the completion tokens.
    nll = torch.nn.functional.cross_entropy(logits[:n, :-1].flatten(0, 1), labels[:n, 1:].flatten(),
                                            ignore_index=IGNORE_INDEX)
    expected = nll - losses.mean()
    assert abs(float(loss_sum) / n - float(expected)) < 1e-5
    assert abs(float(metrics["reward_chosen"]) / n - float(chosen_rewards.mean())) < 1e-5
    assert abs(float(metrics["reward_rejected"]) / n - float(rejected_rewards.mean())) < 1e-5


def test_reward_loss_equals_trl_reward_trainer(test_tokenizer, test_model_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from ftmagic.engine.heads import Reward

    rows = _rows(test_tokenizer, "reward")
    model = AutoModelForSequenceClassification.from_pretrained(test_model_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = test_tokenizer.pad_token_id
    args = RewardConfig(output_dir=str(tmp_path / "trl-rm"), report_to="none", use_cpu=True, max_length=None)
    dataset = Dataset.from_list([{"chosen": "b", "rejected": "c"}] * 2)
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=test_tokenizer)
    model = trainer.model
    torch.manual_seed(3)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    model.train()
    seqs = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    batch = _trl_batch(rows, test_tokenizer.pad_token_id)
    del batch["completion_mask"]
    theirs = trainer.compute_loss(model, batch)
    theirs.backward()
    trl_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    objective = Reward(model, pad_id=test_tokenizer.pad_token_id, plan=PLAN)
    assert objective.fast
    ours_batch = objective.batch(rows)
    with objective.context(model):
        loss_sum, metrics = objective.loss(model, ours_batch)
        (loss_sum / objective.units(ours_batch)).backward()
    assert abs(float(loss_sum) / len(rows) - float(theirs)) < 1e-5
    assert objective.tokens(ours_batch) == sum(len(s["input_ids"]) for s in seqs)
    for name, grad in _grads(model).items():
        assert torch.allclose(grad, trl_grads[name], atol=1e-5), name
