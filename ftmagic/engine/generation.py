"""Generation in batches, and evaluation by generation during and after training.

:func:`generate_batch` answers many prompts at once with ``model.generate`` (left padding,
so every answer starts right after its prompt; greedy unless asked otherwise; each answer
ends at the tokenizer's EOS). Prompts are sorted by length first so a batch holds
similar lengths and little padding. :class:`GenerationEvaluator` is the train loop's
evaluator hook (:mod:`ftmagic.engine.loop`): at each evaluation it answers the
``eval_prompts`` with the model as it is, scores the answers with ``eval_metrics``
(:mod:`ftmagic.scoring`) and reports a :class:`~ftmagic.evalevents.Generations` table.

Example::

    evaluator = GenerationEvaluator(tokenizer, prompts, resolve_metrics(["exact_match"]), plan=device_plan)
    scores, events = evaluator(model, step=100)     # ({'exact_match': 0.82}, [Generations(...)])
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager, nullcontext
from typing import Optional, Sequence

import torch

from ftmagic.engine.device import autocast_for
from ftmagic.evalevents import TABLE_ROWS, Generations
from ftmagic.scoring import Metric, score_answers

GENERATION_BATCH = 32  # prompts per generate call: small models gain little beyond, large ones need the memory


@contextmanager
def _left_padding(tokenizer):
    """Pad on the left while generating (each answer then starts right after its prompt)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side


def generate_batch(model, tokenizer, texts: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = GENERATION_BATCH,
                   do_sample: bool = False, autocast=None, end_ids=None, **kwargs) -> list:
    """Answers to already rendered prompt ``texts`` (template applied), in their order.

    The model is put in eval mode for the call and restored; no gradients; greedy by default.
    An answer ends at any of ``end_ids`` (default: the tokenizer's EOS; the training template's
    end-of-turn token too, as :meth:`RunResult.end_token_ids` gives).

    Example::

        generate_batch(model, tok, [render_prompt(tok, "reverse: abc")], max_new_tokens=8)   # ['cba']
    """
    if not texts:
        return []
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    answers: list = [None] * len(texts)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _left_padding(tokenizer), warnings.catch_warnings(), (autocast or nullcontext()):
            # peft's prompt tuning notes that it ignores position ids; nothing for the user to act on.
            warnings.filterwarnings("ignore", message="Position ids are not supported")
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                # The rendered text already holds any BOS the template wants.
                enc = tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
                enc = {k: v.to(device) for k, v in enc.items()}
                output = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                        eos_token_id=end_ids or tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id,
                                        **kwargs)
                new = output[:, enc["input_ids"].shape[1]:]
                for i, row in zip(chunk, new):
                    answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return answers


class GenerationEvaluator:
    """The loop's evaluator for ``eval_prompts`` / ``eval_metrics``: answer, score, report.

    ``prompts`` are :class:`~ftmagic.data.eval_prompts.EvalPrompt`; they are rendered once,
    with the training template, at construction.
    """

    def __init__(self, tokenizer, prompts: Sequence, metrics: dict, *, template=None, plan=None,
                 max_new_tokens: int = 64, batch_size: int = GENERATION_BATCH):
        from ftmagic.data import render_prompt

        self.tokenizer = tokenizer
        self.prompts = list(prompts)
        self.metrics: dict[str, Metric] = dict(metrics)
        self.plan = plan
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        from ftmagic.data.portable import answer_end_ids
        from ftmagic.data.templates import ChatTemplate, resolve_template

        tpl = template if isinstance(template, ChatTemplate) else resolve_template(tokenizer, template)
        self.texts = [render_prompt(tokenizer, list(p.messages), template=tpl) for p in self.prompts]
        self.end_ids = answer_end_ids(tokenizer, tpl)  # the same ends as RunResult.generate
        self.last_answers: list = []  # every answer of the latest call (the event carries at most TABLE_ROWS)

    def answers(self, model, ranks=None) -> list:
        """Every prompt's answer, in the prompts' order.

        Under several processes that each hold the whole model (DDP, ZeRO-2), each process
        answers every ``world``-th prompt and the answers are gathered, so the work is split.
        Where the weights are sharded (FSDP, ZeRO-3) every forward pass is collective, so every
        process answers every prompt, in step with the others.
        """
        autocast = autocast_for(self.plan)
        split = ranks is not None and ranks.world > 1 and "weights" not in ranks.spec.shards
        texts = self.texts[ranks.rank::ranks.world] if split else self.texts
        mine = generate_batch(model, self.tokenizer, texts, max_new_tokens=self.max_new_tokens,
                              batch_size=self.batch_size, autocast=autocast, end_ids=self.end_ids)
        if not split:
            return mine
        answers: list = [None] * len(self.texts)
        for rank, part in enumerate(ranks.gather(mine)):
            answers[rank::ranks.world] = part
        return answers

    def __call__(self, model, step: int, ranks=None) -> tuple:
        started = time.perf_counter()
        answers = self.last_answers = self.answers(model, ranks)
        scores = score_answers(answers, [p.reference for p in self.prompts], self.metrics)
        rows = [{"prompt": p.text, "reference": p.reference, "answer": a}
                for p, a in zip(self.prompts[:TABLE_ROWS], answers)]
        event = Generations(step=step, rows=rows, metrics=dict(scores), total=len(answers),
                            seconds=round(time.perf_counter() - started, 3))
        return scores, [event]


def evaluator_for(config, tokenizer, prompts: Optional[list], *, template=None, plan=None):
    """The run's generation evaluator, or None when evaluation by generation is off."""
    if not prompts:
        return None
    from ftmagic.scoring import resolve_metrics

    metrics = resolve_metrics(config.eval_metrics or ["exact_match"])
    return GenerationEvaluator(tokenizer, prompts, metrics, template=template, plan=plan,
                               max_new_tokens=config.eval_max_new_tokens)
