"""The causal-LM training loss without the vocabulary-sized logits.

A causal LM's own forward computes the logits of every position (batch x tokens x vocabulary) and then the
cross-entropy over them; backward keeps their log-softmax and makes a gradient of the same size. At 4 x 128
tokens one fp32 copy is 100 MiB for SmolLM2 (49,152 tokens) and 512 MiB for Gemma 3 (262,144); for Llama 3
(128,256) at 8 x 2,048 tokens it is 8 GiB. Structured pruning of the layers shrinks none of it.

:func:`use_chunked_loss` gives one model instance a forward that, when the call has ``labels``, runs the
decoder body as usual and computes the loss from its last hidden states with PyTorch's
``torch.nn.functional.linear_cross_entropy``: LM head and cross-entropy together, a chunk of tokens at a time,
over the labelled positions only (the assistant's tokens of chat data), never holding the whole logits. The
output then has ``loss`` and no ``logits``. Every other call goes to the model's own forward unchanged: calls
without labels (evaluation, generation, a distillation teacher), calls that ask for hidden states or attentions
(self-distillation reads the student's logits), ``logits_to_keep`` and tuple outputs.

Before PyTorch 2.13 (no ``linear_cross_entropy``), :func:`chunked_cross_entropy` checkpoints each chunk instead:
the same loss and memory, with the head run twice.

The loss is the model's own (transformers' ``ForCausalLMLoss``: labels shifted by one, the mean over labelled
tokens, or their sum over ``num_items_in_batch`` when a trainer passes it), up to float rounding. Under bf16
autocast the head runs in bf16 as it would under autocast, with fp32 accumulation inside the chunked kernel;
with bf16 weights the returned loss value is rounded to bf16 while its gradients are accumulated in fp32.

It applies to the decoder families whose forward is "decoder body, LM head, loss" with nothing in between
(:data:`FAMILIES`, no final logit soft-capping), and not to FSDP-sharded heads (their weight is a shard that
only the head's own forward gathers): :func:`chunked_loss_unsupported` says why not, and the run keeps the
model's own loss.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

IGNORE_INDEX = -100
# model types whose ForCausalLM forward is: hidden = self.model(...); logits = self.lm_head(hidden); loss
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text")
# the fp32 logits of one chunk, per device type, and the fewest tokens per chunk (measured: see chunk_rows)
CHUNK_BYTES = {"cpu": 32 * 2**20, "cuda": 512 * 2**20}
MIN_ROWS = 128
# calls that need the logits (or what the body returns besides the last hidden states)
_FULL_OUTPUT_FLAGS = ("output_hidden_states", "output_attentions")


def chunked_loss_unsupported(model: nn.Module) -> str | None:
    """Why :func:`use_chunked_loss` cannot apply to ``model``, or None when it can."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return (
            f"{type(model).__name__} is not a transformers model (unwrap a PEFT model with get_base_model())"
        )
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        return f"model type {model_type!r} is not one of {', '.join(FAMILIES)}"
    head = getattr(model, "lm_head", None)
    body = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if not isinstance(head, nn.Linear) or not isinstance(body, nn.Module) or body is model:
        return "the model has no decoder body and nn.Linear lm_head"
    if getattr(config, "final_logit_softcapping", None):
        return "the model soft-caps its logits"
    if _sharded_head(model):
        return "the LM head is sharded (FSDP)"
    return None


def decoder_body(model: nn.Module) -> nn.Module:
    """The decoder under a causal LM's head (``model.model`` for the LLaMA family)."""
    return getattr(model, model.base_model_prefix)


def _sharded_head(model: nn.Module) -> bool:
    """Whether the LM head's weight is an FSDP shard, which only the head's own forward gathers."""
    return type(model.lm_head.weight).__name__ == "DTensor"


def use_chunked_loss(model: nn.Module) -> bool:
    """Compute ``model``'s training loss without its logits (see the module's docstring); True when it applies.

    The new forward belongs to the instance (a deep copy, such as a distillation teacher, gets its own) and has
    the class forward's signature (what the Hugging Face Trainer and ``generate`` inspect);
    :func:`use_model_loss` restores the model's own forward."""
    if chunked_loss_unsupported(model) is not None:
        return False
    model.forward = ChunkedLossForward(model)
    return True


def use_model_loss(model: nn.Module) -> None:
    """Undo :func:`use_chunked_loss`: the model's own forward (logits and loss) again."""
    if uses_chunked_loss(model):
        del model.forward


def uses_chunked_loss(model: nn.Module) -> bool:
    return isinstance(model.__dict__.get("forward"), ChunkedLossForward)


class ChunkedLossForward:
    """A causal LM's forward that computes the loss without logits when the call has labels."""

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def __signature__(self) -> inspect.Signature:
        own = inspect.signature(type(self.model).forward)
        return own.replace(parameters=list(own.parameters.values())[1:])  # bound: without self

    def __call__(self, *args: Any, labels: Tensor | None = None, **kwargs: Any) -> Any:
        model = self.model
        if (
            labels is None
            or args
            or any(kwargs.get(flag) for flag in _FULL_OUTPUT_FLAGS)
            or not _all_positions(kwargs.get("logits_to_keep"))
            or kwargs.get("return_dict") is False
            or _sharded_head(model)
        ):
            return type(model).forward(model, *args, labels=labels, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("logits_to_keep", None)
        kwargs.pop("return_dict", None)
        num_items = kwargs.get("num_items_in_batch")  # the model's own forward hands these to the body too
        shift_labels = kwargs.pop("shift_labels", None)
        out = decoder_body(model)(**kwargs)
        loss = lm_head_loss(
            out.last_hidden_state,
            model.lm_head,
            labels,
            shift_labels=shift_labels,
            num_items_in_batch=num_items,
        )
        return CausalLMOutputWithPast(loss=loss, logits=None)


def _all_positions(logits_to_keep: Any) -> bool:
    """Whether ``logits_to_keep`` (an int, a tensor of positions, or None) asks for every position."""
    return logits_to_keep is None or (isinstance(logits_to_keep, int) and logits_to_keep == 0)


def chunk_rows(vocab_size: int, device: str) -> int:
    """Tokens per chunk: their fp32 logits about :data:`CHUNK_BYTES` of the device, at least :data:`MIN_ROWS`.

    Each chunk reads the whole head weight again, so small chunks are slow: PyTorch's own choice ("auto", a
    few tokens per chunk) took 5.5x the whole logits' time for SmolLM2 and 15x for Gemma 3 on 2 CPU cores;
    chunks of 128 tokens took 0.77x and 0.88x, and 64 tokens 0.96x and 1.09x
    (``benchmarks/results/lm-loss-cpu/chunks.json``)."""
    budget = CHUNK_BYTES.get(device, CHUNK_BYTES["cuda"])
    rows = budget // (4 * vocab_size)
    return max(MIN_ROWS, 1 << max(0, rows.bit_length() - 1))


def chunk_options(rows: int, device: str) -> Any:
    """``linear_cross_entropy``'s options for chunks of ``rows`` tokens on ``device`` (a device type). The CPU
    accumulates in fp32 ("accurate": PyTorch's other policies hit its emulated low-precision matmuls, 20-50x
    slower); elsewhere PyTorch's own choice per device and dtype."""
    from torch.nn import LinearCrossEntropyOptions

    return LinearCrossEntropyOptions(
        chunking_method=None, batch_chunk_size=rows, acc_policy="accurate" if device == "cpu" else "auto"
    )


def lm_head_loss(
    hidden: Tensor,
    head: nn.Linear,
    labels: Tensor,
    shift_labels: Tensor | None = None,
    num_items_in_batch: Tensor | int | None = None,
) -> Tensor:
    """Next-token cross-entropy of ``head(hidden)`` against ``labels`` (batch x tokens, -100 ignored) without
    the logits: the mean over labelled tokens, or their sum divided by ``num_items_in_batch``."""
    total, count = summed_lm_head_loss(hidden, head, labels, shift_labels)
    if num_items_in_batch is not None:
        return total / torch.as_tensor(num_items_in_batch, device=total.device)
    return total / count  # no labelled token: 0 / 0 = nan, as the model's own loss gives


def summed_lm_head_loss(
    hidden: Tensor, head: nn.Linear, labels: Tensor, shift_labels: Tensor | None = None
) -> tuple[Tensor, int]:
    """The summed next-token cross-entropy (fp32) of ``head(hidden)`` over the labelled tokens, and their
    number; a chunk of tokens at a time, without the logits."""
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    target = shift_labels.reshape(-1).to(hidden.device)
    keep = target != IGNORE_INDEX
    states = hidden.reshape(-1, hidden.shape[-1])[keep]
    target = target[keep]
    weight, bias = head.weight, head.bias
    device = hidden.device.type
    if torch.is_autocast_enabled(device):  # the head would run in the autocast dtype
        dtype = torch.get_autocast_dtype(device)
        states, weight = states.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    elif states.dtype != weight.dtype:
        states = states.to(weight.dtype)
    total = chunked_cross_entropy(states, weight, bias, target, chunk_rows(head.out_features, device))
    return total, int(target.numel())


def chunked_cross_entropy(
    states: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, rows: int
) -> Tensor:
    """The summed cross-entropy (fp32) of ``linear(states, weight, bias)`` against ``target`` (tokens, no
    ignored ones), ``rows`` tokens at a time, never holding the whole logits.

    With PyTorch's ``linear_cross_entropy`` (2.13 and later) the gradients are computed in the forward pass,
    a chunk at a time. Older PyTorch versions get activation checkpointing per chunk: each chunk's logits are
    made in the forward pass and dropped, and made again in the backward pass, so the head runs twice."""
    if hasattr(nn.functional, "linear_cross_entropy"):
        return nn.functional.linear_cross_entropy(
            states,
            weight,
            target,
            linear_bias=bias,
            reduction="sum",
            options=chunk_options(rows, states.device.type),
        ).float()
    from torch.utils.checkpoint import checkpoint

    total = states.new_zeros((), dtype=torch.float32)
    for start in range(0, len(target), rows):
        part = slice(start, start + rows)
        total = total + checkpoint(_chunk_loss, states[part], weight, bias, target[part], use_reentrant=False)
    return total


def _chunk_loss(states: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor) -> Tensor:
    return nn.functional.cross_entropy(
        nn.functional.linear(states, weight, bias).float(), target, reduction="sum"
    )
