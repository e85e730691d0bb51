"""What a run gives back: metrics, history, and a model you can talk to.

``generate`` renders the prompt with the exact template the training data used (the
data layer's :func:`ftmagic.data.render_prompt`) and stops at every token that ends an
answer (EOS and the template's end-of-turn token, the same list the saved
``generation_config.json`` holds), so what you see is what the model learned and what
any other runtime reading the saved folder produces. ``export`` takes the run to merged
weights, GGUF, Ollama and the Hub (:mod:`ftmagic.engine.export`). ``compare`` answers the same prompts with the
base model (adapter switched off, or the original weights) and with the tuned one.

Example::

    result = RunResult.load("ftmagic-output")
    print(result.metrics["train_loss"])
    print(result.generate("reverse: hello"))
    for row in result.compare(["reverse: abc", "reverse: xyz"]):
        print(row["prompt"], row["base"], row["tuned"])
    print(result.export(["gguf", "ollama"]))
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch

from ftmagic.constants import RUN_FILE
from ftmagic.errors import CheckpointError, FtmagicError, a_type


class RunResult:
    """The outcome of :func:`ftmagic.finetune`; also loadable from its ``output_dir``."""

    def __init__(self, *, output_dir: str, metrics: dict, history: list, config, model=None, tokenizer=None,
                 base_model_path: Optional[str] = None, method: Optional[str] = None, plan: Optional[dict] = None,
                 labels: Optional[list] = None):
        self.output_dir = output_dir
        self.objective = getattr(config, "objective", "sft")
        self.labels = list(labels) if labels is not None else None  # a classifier's label names, by output
        self.metrics = metrics
        self.history = history
        self.config = config
        self.method = method or getattr(config, "method", None)
        self.base_model_path = base_model_path
        self.plan = plan or {}
        self._model = model
        self._tokenizer = tokenizer
        self._base = None  # the original model, loaded on demand for methods without adapters
        self._end_ids = None  # token ids that end an answer, computed on first generation
        self.exports = None  # the ExportSummary of the export the config asked for at the end of the run
        self.export_error: Optional[str] = None  # why that export failed (the run itself is saved)

    def __repr__(self) -> str:
        loss = self.metrics.get("train_loss")
        shown = f"{loss:.4f}" if isinstance(loss, float) else loss
        return f"RunResult(output_dir={self.output_dir!r}, method={self.method!r}, steps={self.metrics.get('steps')}, train_loss={shown})"

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, output_dir) -> "RunResult":
        """Open a finished run's folder (adapter or full weights, tokenizer, config, metrics).

        Example::

            result = RunResult.load("ftmagic-output")
        """
        from ftmagic.config import FinetuneConfig

        out = Path(os.path.expanduser(str(output_dir)))
        try:
            info = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
            if not isinstance(info, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError, RecursionError):
            raise CheckpointError(f"`{out}` is not a finished ftmagic run (no readable {RUN_FILE})") from None
        if not info.get("finished"):
            raise CheckpointError(f"the run in `{out}` did not finish; resume it with `resume: true`")
        try:
            config = FinetuneConfig.from_file(str(out / "config.yaml"))
            metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
            history_file = out / "history.json"
            history = json.loads(history_file.read_text(encoding="utf-8")) if history_file.exists() else []
        except (OSError, ValueError, RecursionError) as exc:
            if isinstance(exc, FtmagicError):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise CheckpointError(f"`{out}` is not a complete ftmagic run ({first})") from None
        base = info.get("base_model") or config.model
        if config.model == "tiny" and not os.path.isdir(base):
            # The folder was written on another machine; the embedded model is here too.
            from ftmagic.engine.models import resolve_model_path

            base = resolve_model_path("tiny")
        return cls(output_dir=str(out), metrics=metrics, history=history, config=config, base_model_path=base,
                   method=info.get("trained_method", config.method), plan=info.get("plan"), labels=info.get("labels"))

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from ftmagic.engine.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.output_dir, trust_remote_code=self._trust_remote_code())
        return self._tokenizer

    @property
    def model(self):
        """The tuned model (loaded from ``output_dir`` on first use after :meth:`load`)."""
        if self._model is None:
            plan = self._device_plan()
            if plan is not None:
                from ftmagic.engine.device import limit_onednn_cache

                limit_onednn_cache(plan)  # bf16 weights on a CPU: as in training
            self._model = self._load_tuned()
        return self._model

    def _device(self) -> str:
        device = self.plan.get("device", "cpu")
        return device if device != "cuda" or torch.cuda.is_available() else "cpu"

    def _device_plan(self):
        from ftmagic.engine.device import DevicePlan

        fields = {k: v for k, v in (self.plan or {}).items() if k in DevicePlan.__dataclass_fields__}
        if not fields:
            return None
        plan = DevicePlan(**fields)
        if plan.device != self._device():  # a GPU run opened on a CPU machine
            # A QLoRA adapter keeps its 4-bit base (bitsandbytes computes it on the CPU): it learned on those weights.
            plan = DevicePlan(device="cpu", precision="fp32", use_grad_scaler=False,
                              qlora_compute_dtype="float32" if plan.qlora_compute_dtype else None,
                              method=plan.method, reason="cpu")
        return plan

    def _weight_dtype(self, adapter: bool):
        from ftmagic.engine.device import base_weight_dtype

        plan = self._device_plan()
        # The same dtypes as in training, so reloaded generations match the trained model's.
        return base_weight_dtype(plan, adapter=adapter) if plan is not None else torch.float32

    def _head(self):
        from ftmagic.engine.models import head_settings

        return head_settings(self.objective, self.labels)

    def _load_base(self, quantized: bool):
        from ftmagic.engine.models import FOUR_BIT_FAILURES, four_bit_failure, load_model

        plan = self._device_plan()
        compute = plan.qlora_compute_dtype if (quantized and plan is not None) else None
        dtype = self._weight_dtype(adapter=quantized or self._is_adapter())
        settings = dict(device=self._device(), weight_dtype=dtype, trust_remote_code=self._trust_remote_code(),
                        head=self._head())
        if compute:
            try:
                return load_model(self.base_model_path, qlora_compute_dtype=compute, **settings)
            except FOUR_BIT_FAILURES as exc:  # as the run's own QLoRA fallback
                warnings.warn(f"{self.output_dir}: the base loads in full precision, not the 4-bit weights the "
                              f"adapter trained on (4-bit cannot load here: {four_bit_failure(exc)}); "
                              "answers may differ slightly from the trained model's", stacklevel=3)
        return load_model(self.base_model_path, **settings)

    def _trust_remote_code(self) -> bool:
        return bool(getattr(self.config, "trust_remote_code", False))

    def _is_adapter(self) -> bool:
        return (Path(self.output_dir) / "adapter_config.json").exists()

    def _load_tuned(self):
        out = Path(self.output_dir)
        if self._is_adapter():
            from peft import PeftModel

            from ftmagic.engine.models import quiet_peft

            base = self._load_base(quantized=self.method == "qlora")
            with quiet_peft():
                model = PeftModel.from_pretrained(base, str(out))
        else:
            from ftmagic.engine.models import load_model

            model = load_model(str(out), device=self._device(), weight_dtype=self._weight_dtype(adapter=False),
                               trust_remote_code=self._trust_remote_code(), head=self._head())
        model.eval()
        return model

    # ------------------------------------------------------------------ heads
    def score(self, conversations, batch_size: int = 16) -> list:
        """A reward model's score of each conversation (``objective: reward``); higher is preferred.

        Each conversation is a list of messages (or a ``{"messages": [...]}`` record) rendered
        with the training template, as the pairs were.

        Example::

            result.score([[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]])
        """
        self._needs("reward", "score")
        from ftmagic.data import encode_conversations
        from ftmagic.data.encode import as_conversation
        from ftmagic.data.problems import RecordError

        if conversations and isinstance(conversations[0], dict) and "role" in conversations[0]:
            conversations = [conversations]  # one conversation given as its list of messages
        convs = [as_conversation(c["messages"] if isinstance(c, dict) and "messages" in c else c) for c in conversations]
        encoded = encode_conversations(self.tokenizer, convs, template=getattr(self.config, "template", None),
                                       max_seq_len=getattr(self.config, "max_seq_len", None))
        rows = []
        for enc in encoded:
            if isinstance(enc, RecordError):
                from ftmagic.errors import DataError

                raise DataError(f"score: {enc.message}")
            rows.append({"input_ids": enc.input_ids})
        return [float(v) for v in self._pooled(rows, batch_size)[:, 0]]

    def predict(self, texts, batch_size: int = 32, probabilities: bool = False) -> list:
        """A classifier's label for each text (``objective: classify``); with ``probabilities``,
        ``{label: probability}`` for each text instead.

        Example::

            result.predict(["a wonderful film", "dull and slow"])     # ['pos', 'neg']
        """
        self._needs("classify", "predict")
        from ftmagic.data.pairs import encode_texts

        if isinstance(texts, str):
            texts = [texts]
        rows = [{"input_ids": e.input_ids} for e in encode_texts(self.tokenizer, list(texts),
                                                                     max_seq_len=getattr(self.config, "max_seq_len", None))]
        probs = torch.softmax(self._pooled(rows, batch_size).float(), dim=-1)
        labels = self.labels or [str(i) for i in range(probs.shape[1])]
        if probabilities:
            return [{label: float(p) for label, p in zip(labels, row)} for row in probs]
        return [labels[int(i)] for i in probs.argmax(-1)]

    def _needs(self, objective: str, what: str) -> None:
        if self.objective != objective:
            from ftmagic.errors import FtmagicError

            raise FtmagicError(f"`{what}` needs a run with `objective: {objective}`; this one was trained with "
                               f"`objective: {self.objective}`")

    def _pooled(self, rows: list, batch_size: int):
        """The head's outputs for encoded rows ``[rows, outputs]`` (the training code path, no gradients)."""
        from ftmagic.engine.device import autocast_for
        from ftmagic.engine.heads import pooled_logits, sequence_batch, supports_pooled_fast_path
        from ftmagic.engine.fastpath import varlen_attention
        from contextlib import nullcontext

        model = self.model
        fast = supports_pooled_fast_path(model)
        device = next(model.parameters()).device
        plan = self._device_plan()
        multiple = plan.row_multiple if plan is not None else 1  # rounded as in training (oneDNN's kernels)
        out = []
        was_training = model.training
        model.eval()
        with torch.no_grad(), (varlen_attention(model) if fast else nullcontext()), autocast_for(plan):
            for start in range(0, len(rows), batch_size):
                batch = sequence_batch(rows[start:start + batch_size], fast=fast, pad_id=self.tokenizer.pad_token_id,
                                       multiple=multiple)
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                out.append(pooled_logits(model, batch).float().cpu())
        model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, 1)

    # ------------------------------------------------------------------ generation
    def render(self, prompt: str) -> str:
        """The exact text the model sees for ``prompt`` (training template + generation prompt)."""
        template = getattr(self.config, "template", None)
        system = getattr(self.config, "system_prompt", None)
        from ftmagic.data import render_prompt

        return render_prompt(self.tokenizer, prompt, template=template, system_prompt=system)

    def generate(self, prompt: str, max_new_tokens: int = 64, do_sample: bool = False, **kwargs: Any) -> str:
        """Answer ``prompt`` with the tuned model; greedy by default, stops at the end of the answer.

        Example::

            result.generate("reverse: hello")   # -> "olleh"
        """
        self._check_generates()
        return self._generate(self.model, prompt, max_new_tokens=max_new_tokens, do_sample=do_sample, **kwargs)

    def evaluate(self, prompts=None, metrics=None, *, max_new_tokens: Optional[int] = None, base: bool = False) -> dict:
        """Answer ``prompts`` and score the answers: evaluation by generation after the fact.

        ``prompts`` takes what ``eval_prompts`` takes (a file, records with answers, a list of
        plain strings: a lone string is read as a file); ``None`` uses the run's own ``eval_prompts`` when it named a file or records.
        ``metrics`` takes what ``eval_metrics`` takes (default: the run's, else exact match).
        ``base=True`` also answers with the base model. Returns ``{"metrics", "rows"}``
        (plus ``"base_metrics"``), each row ``{"prompt", "reference", "answer"}`` (and ``"base"``).

        Example::

            report = result.evaluate("test.jsonl", ["exact_match", "chrf"], base=True)
            report["base_metrics"]["exact_match"], report["metrics"]["exact_match"]   # 0.0, 1.0
        """
        from ftmagic.data.eval_prompts import eval_prompts_from
        from ftmagic.engine.generation import GenerationEvaluator
        from ftmagic.errors import ConfigError
        from ftmagic.scoring import resolve_metrics

        self._check_generates()
        config = self.config
        if prompts is None:
            prompts = getattr(config, "eval_prompts", None)
            if prompts is None or isinstance(prompts, int) or (isinstance(prompts, str) and prompts.startswith("<")):
                raise ConfigError("evaluate: give the prompts (a file, records with answers, or a list of strings)")
        chosen = metrics if metrics is not None else (getattr(config, "eval_metrics", None) or ["exact_match"])
        if max_new_tokens is None:
            max_new_tokens = getattr(config, "eval_max_new_tokens", 64)
        _check_max_new_tokens(max_new_tokens)  # 0 is not "the default", 2.5 not 2 tokens
        evaluator = GenerationEvaluator(
            self.tokenizer, eval_prompts_from(prompts, system_prompt=getattr(config, "system_prompt", None),
                                              key="prompts"),
            resolve_metrics(chosen), template=getattr(config, "template", None), max_new_tokens=max_new_tokens,
            plan=self._device_plan())  # the run's autocast, as its own evaluations used
        scores, _ = evaluator(self.model, self.metrics.get("steps", 0))
        rows = [{"prompt": p.text, "reference": p.reference, "answer": a}
                for p, a in zip(evaluator.prompts, evaluator.last_answers)]
        report = {"metrics": scores, "rows": rows}
        if base:
            with self._base_model() as model:
                base_scores, _ = evaluator(model, 0)
            for row, answer in zip(rows, evaluator.last_answers):
                row["base"] = answer
            report["base_metrics"] = base_scores
        return report

    def lm_eval(self, tasks, *, include_path: Optional[str] = None, limit: Optional[int] = None,
                num_fewshot: Optional[int] = None, batch_size: int = 8, **kwargs: Any) -> dict:
        """Run lm-evaluation-harness tasks on the tuned model; lm_eval's ``results`` per task.

        ``include_path`` is a folder of your own task YAML files (lm_eval's custom tasks), so
        tasks whose data is on this machine run without a hub. Needs ``pip install 'ftmagic[lm-eval]'``.

        Example::

            result.lm_eval(["my_task"], include_path="tasks/", limit=100)   # {'my_task': {'exact_match,none': 0.9, ...}}
        """
        from ftmagic.engine.lm_eval_hook import run_lm_eval

        return run_lm_eval(self.model, self.tokenizer, tasks, include_path=include_path, limit=limit,
                           num_fewshot=num_fewshot, batch_size=batch_size, **kwargs)

    def generate_ids(self, prompt, max_new_tokens: int = 64, do_sample: bool = False, **kwargs: Any) -> list:
        """The answer's token ids, the end token included (what ``generate`` decodes).

        Example::

            result.generate_ids("reverse: abc")   # e.g. [72, 71, 70, 2]
        """
        self._check_generates()
        return self._generate_ids(self.model, prompt, max_new_tokens=max_new_tokens, do_sample=do_sample, **kwargs)

    def end_token_ids(self) -> list:
        """Every token id that ends an answer: EOS and the training template's end-of-turn token."""
        if self._end_ids is None:
            from ftmagic.data.portable import answer_end_ids
            from ftmagic.data.templates import resolve_template

            self._end_ids = answer_end_ids(self.tokenizer, resolve_template(self.tokenizer, self.config.template))
        return self._end_ids

    def export(self, to, *, quant=None, repo_id: Optional[str] = None, overwrite: bool = False,
               private: Optional[bool] = None, on_event=None, hub_api=None):
        """Export the run: ``to`` is any of ``merged``, ``gguf``, ``ollama``, ``hub`` (a list or ``"a,b"``).

        ``quant``: GGUF types such as ``"q8_0"`` or ``["f16", "q4_k_m"]`` (default: ``gguf_quant``);
        ``repo_id``: ``user/name`` for the Hub (default: ``push_to_hub``). Existing files are
        never replaced unless ``overwrite=True``. Returns an ``ExportSummary`` (files, sizes,
        commands); printing it shows them.

        Example::

            print(result.export("gguf", quant=["f16", "q8_0"]))
            result.export("hub", repo_id="me/reverse-words")
        """
        from ftmagic.engine.export import export_run

        return export_run(self, to, quant=quant, repo_id=repo_id, overwrite=overwrite, private=private,
                          on_event=on_event, hub_api=hub_api)

    def compare(self, prompts, max_new_tokens: int = 64) -> list[dict]:
        """Base against tuned: ``[{"prompt", "base", "tuned"}, ...]`` (greedy decoding).

        Example::

            for row in result.compare(["reverse: abc"]):
                print(row)
        """
        self._check_generates()
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, Iterable):
            from ftmagic.errors import FtmagicError

            raise FtmagicError(f"compare: give a prompt or a list of prompts, not {a_type(prompts)}")
        prompts = list(prompts)  # a generator would be used up by the tuned answers
        tuned = [self.generate(p, max_new_tokens=max_new_tokens) for p in prompts]
        with self._base_model() as base:
            base_answers = [self._generate(base, p, max_new_tokens=max_new_tokens) for p in prompts]
        return [{"prompt": p, "base": b, "tuned": t} for p, b, t in zip(prompts, base_answers, tuned)]

    def _check_generates(self) -> None:
        from ftmagic.objectives import get_objective_spec

        if not get_objective_spec(self.objective).generates:
            from ftmagic.errors import FtmagicError

            use = "score(conversations)" if self.objective == "reward" else "predict(texts)"
            raise FtmagicError(f"a run with `objective: {self.objective}` has a classification head and does not "
                               f"write text; use `.{use}`")

    @contextmanager
    def _base_model(self):
        model = self.model
        if hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                yield model
            return
        if self._base is None:
            self._base = self._load_base(quantized=False)
            self._base.eval()
        yield self._base

    def _generate(self, model, prompt, *, max_new_tokens: int, do_sample: bool = False, **kwargs) -> str:
        new = self._generate_ids(model, prompt, max_new_tokens=max_new_tokens, do_sample=do_sample, **kwargs)
        return self.tokenizer.decode(new, skip_special_tokens=True).strip()

    def _generate_ids(self, model, prompt, *, max_new_tokens: int, do_sample: bool = False, **kwargs) -> list:
        from ftmagic.engine.device import autocast_for
        from ftmagic.errors import FtmagicError

        if not isinstance(prompt, (str, list, tuple)):  # a user message, or the conversation so far
            raise FtmagicError(f"a prompt must be text or a list of messages, not {a_type(prompt)}: "
                               f"{str(prompt)[:40]!r}")
        _check_max_new_tokens(max_new_tokens)
        tok = self.tokenizer
        text = self.render(prompt)
        # The rendered text already holds any BOS the template wants; adding another would
        # differ from what training saw.
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(positions, int) and enc["input_ids"].shape[1] >= positions:
            raise FtmagicError(f"the prompt is {enc['input_ids'].shape[1]:,} tokens with the template; the model reads "
                               f"at most {positions:,} (`max_position_embeddings`): shorten it")
        device = next(model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        was_training = model.training
        model.eval()
        with torch.no_grad(), warnings.catch_warnings(), autocast_for(self._device_plan()):
            # peft's prompt tuning notes that it ignores position ids; nothing for the user to act on.
            warnings.filterwarnings("ignore", message="Position ids are not supported")
            output = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                    eos_token_id=self.end_token_ids(), pad_token_id=tok.pad_token_id, **kwargs)
        model.train(was_training)
        return output[0, enc["input_ids"].shape[1]:].tolist()


def _check_max_new_tokens(value) -> None:
    """Refuse in one line what transformers would refuse with its own error, or read as something else
    (``True`` as one token, ``2.5`` as two)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FtmagicError(f"`max_new_tokens: {value!r}` must be a whole number of at least 1 (e.g. 64)")
