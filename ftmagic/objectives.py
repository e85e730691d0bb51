"""The training objectives: one torch-free table of what each objective trains on and with.

Every layer reads this table: the config's validation (which names exist, which data
format and method each accepts), the data layer (which formats to detect), the memory
calculator (sequences per record, a reference forward, which head) and the engine, whose
objectives (:mod:`ftmagic.engine.objectives`) add only *how* a loss is computed.

============ ============== ====== ========= ===== =====================================================
objective    data           head   reference  seqs  loss
============ ============== ====== ========= ===== =====================================================
sft          conversations  lm     no          1   next-token cross-entropy on the trained tokens
dpo          preference     lm     yes         2   DPO (sigmoid) or IPO on summed completion log-probs
orpo         preference     lm     no          2   NLL of the chosen side + odds-ratio term (no reference)
reward       preference     score  no          2   Bradley-Terry: -log sigmoid(r_chosen - r_rejected)
classify     classification labels no          1   cross-entropy over the labels
============ ============== ====== ========= ===== =====================================================

``lm`` is the model's own output layer; ``score`` a sequence-classification head with
one output; ``labels`` one with an output per label. The reference of DPO is the model
as it was before training: for adapter methods the base with the adapter switched off
(no second copy in memory), for the others a frozen copy.

Example::

    >>> from ftmagic.objectives import get_objective_spec
    >>> spec = get_objective_spec("dpo")
    >>> spec.data, spec.reference, spec.sequences
    ('preference', True, 2)
"""

from __future__ import annotations

from dataclasses import dataclass

from ftmagic.errors import not_accepted

DATA_KINDS = ("conversations", "preference", "classification")
HEADS = ("lm", "score", "labels")
DPO_LOSSES = ("sigmoid", "ipo")


@dataclass(frozen=True)
class ObjectiveSpec:
    """What one objective needs; the engine adds how its loss is computed."""

    name: str
    data: str  # one of DATA_KINDS: which records it trains on
    head: str  # one of HEADS
    reference: bool  # needs the frozen starting model's log-probabilities
    sequences: int  # sequences per record (2: chosen and rejected)
    unit: str  # what the loss is a mean over: "token", "pair" or "example"
    summary: str

    @property
    def classifier_head(self) -> bool:
        """The model gets a sequence-classification head instead of its language-model head."""
        return self.head != "lm"

    @property
    def generates(self) -> bool:
        """The trained model writes text (``RunResult.generate``); heads score or classify instead."""
        return self.head == "lm"


OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register_objective(spec: ObjectiveSpec) -> ObjectiveSpec:
    """Add an objective to the table; a duplicate name or an unknown data kind or head is a programming error."""
    if spec.name in OBJECTIVES:
        raise ValueError(f"objective {spec.name!r} is already registered")
    if spec.data not in DATA_KINDS or spec.head not in HEADS:
        raise ValueError(f"objective {spec.name!r}: data={spec.data!r} head={spec.head!r} is not known")
    OBJECTIVES[spec.name] = spec
    return spec


register_objective(ObjectiveSpec("sft", "conversations", "lm", False, 1, "token",
                                 "supervised fine-tuning: next-token loss on the answers"))
register_objective(ObjectiveSpec("dpo", "preference", "lm", True, 2, "pair",
                                 "direct preference optimisation against the frozen starting model"))
register_objective(ObjectiveSpec("orpo", "preference", "lm", False, 2, "pair",
                                 "odds-ratio preference optimisation: SFT and preference in one loss, no reference"))
register_objective(ObjectiveSpec("reward", "preference", "score", False, 2, "pair",
                                 "a reward model: one score per conversation, trained on pairs (Bradley-Terry)"))
register_objective(ObjectiveSpec("classify", "classification", "labels", False, 1, "example",
                                 "a classifier: a head over the model's pooled output"))

OBJECTIVE_NAMES = tuple(OBJECTIVES)


def get_objective_spec(name: str) -> ObjectiveSpec:
    """The table entry for ``name``; a one-line ConfigError (with the closest name) otherwise.

    Example::

        get_objective_spec("reward").head    # 'score'
    """
    try:
        return OBJECTIVES[name]
    except (KeyError, TypeError):
        raise not_accepted("objective", name, list(OBJECTIVES)) from None


def method_supports(method_spec, objective: str) -> bool:
    """Whether a method (a :class:`~ftmagic.methods.MethodSpec`) can train ``objective``.

    Prompt and prefix tuning prepend virtual tokens inside peft's own forward, which the
    pair and head objectives do not run; every other method trains every objective.

    Example::

        >>> from ftmagic.methods import get_method_spec
        >>> method_supports(get_method_spec("prompt_tuning"), "dpo"), method_supports(get_method_spec("qlora"), "dpo")
        (False, True)
    """
    return objective == "sft" or not method_spec.prompt_learning
