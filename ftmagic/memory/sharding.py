"""Memory per device when one run trains on N devices: what each strategy replicates, shards and buffers.

The engine splits every micro-batch across the devices (``ftmagic/strategies.py``), so
each device's activations and logits are those of ``ceil(batch_size / N)`` rows. What
else a device holds depends on the strategy (the facts of what it shards come from the
strategy table):

* **DDP** replicates weights, gradients and optimizer states, and keeps its gradient
  buckets: a second, flattened copy of the gradients that the all-reduce works on
  (``gradient_as_bucket_view`` is off in accelerate's default).
* **FSDP** (full shard) keeps 1/N of every weight, gradient and optimizer state. While a
  block runs, its weights are gathered whole, and the next one is prefetched (two blocks
  at once); the root unit (embeddings, final norm and output layer) stays gathered from
  the forward pass to the end of the backward pass. A block's full gradients exist until
  they are reduce-scattered.
* **DeepSpeed ZeRO-2** partitions gradients and optimizer states, which with half
  precision hold fp32 master weights as well as both Adam moments (12 bytes per trained
  weight, over N); weights stay replicated. Its reduce bucket (5e8 elements by default,
  or all gradients when fewer) is a communication buffer.
* **DeepSpeed ZeRO-3** also partitions the weights; the weights of the modules running
  (two blocks, and the embeddings or head at either end) are gathered, as for FSDP.

Example::

    >>> from ftmagic.memory import estimate_memory
    >>> one = estimate_memory("llama-3.1-8b", method="full", batch_size=8)
    >>> four = estimate_memory("llama-3.1-8b", method="full", batch_size=8, devices=4, strategy="fsdp")
    >>> four.total_bytes < one.total_bytes / 3
    True
"""

from __future__ import annotations

from dataclasses import dataclass

from ftmagic.constants import NF4_BYTES_PER_PARAM
from ftmagic.strategies import get_strategy_spec

DEEPSPEED_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default reduce_bucket_size
PREFETCHED_BLOCKS = 2  # the block that runs and the one prefetched (FSDP's BACKWARD_PRE / ZeRO-3's prefetch)


@dataclass(frozen=True)
class DeviceShare:
    """Bytes one device holds of each part, plus what the strategy adds while it runs."""

    frozen: int
    trainable: int
    gradients: int
    optimizer_states: int
    gathered: int = 0  # weights gathered whole for the blocks running (forward and backward)
    buffers: int = 0  # communication buffers: DDP's gradient buckets, ZeRO's reduce bucket, FSDP's block gradients


def device_share(shape, plan, *, strategy: str, devices: int, frozen: int, trainable_bytes: int, gradients: int,
                 states: int, trainable: int, adapter: bool) -> DeviceShare:
    """What one of ``devices`` devices holds under ``strategy`` (``frozen`` ... ``states``: one device's bytes)."""
    spec = get_strategy_spec(strategy)
    n = max(1, devices)

    def share(value: int, part: str) -> int:
        return -(-int(value) // n) if part in spec.shards else int(value)

    grad_bytes = plan.trainable_bytes
    if spec.engine == "deepspeed" and plan.compute_bytes == 2 and not adapter:
        # DeepSpeed's half-precision optimizer: fp32 master weights plus both moments per trained weight.
        states = trainable * 12
    part = DeviceShare(frozen=share(frozen, "weights"), trainable=share(trainable_bytes, "weights"),
                       gradients=share(gradients, "gradients"), optimizer_states=share(states, "optimizer_states"))
    weight_bytes = plan.base_bytes if adapter else plan.trainable_bytes
    linear_bytes = NF4_BYTES_PER_PARAM if plan.quantized else weight_bytes
    block = shape.linear_params_per_layer * linear_bytes / weight_bytes + shape.norm_params_per_layer
    block_trainable = trainable / max(1, shape.layers)
    if spec.engine == "ddp":
        return DeviceShare(**{**part.__dict__, "buffers": int(gradients)})
    if spec.engine == "fsdp":
        root = shape.embedding_params + shape.head_params + shape.hidden
        gathered = (root + PREFETCHED_BLOCKS * block) * weight_bytes
        return DeviceShare(**{**part.__dict__, "gathered": int(gathered), "buffers": int(block_trainable * grad_bytes)})
    bucket = min(trainable, DEEPSPEED_BUCKET_ELEMENTS) * grad_bytes
    gathered = 0
    if "weights" in spec.shards:  # ZeRO-3
        gathered = (max(shape.embedding_params, shape.head_params) + PREFETCHED_BLOCKS * block) * weight_bytes
    return DeviceShare(**{**part.__dict__, "gathered": int(gathered), "buffers": int(bucket)})


__all__ = ["DEEPSPEED_BUCKET_ELEMENTS", "DeviceShare", "device_share"]
