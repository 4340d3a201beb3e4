"""Sharded training (``aptune train --fsdp``): the frozen weights split over processes with PyTorch's FSDP2.

A model too large for one device in data-parallel training (a 70B LLaMA in bf16 is 138 GB) is still mostly
*frozen* under APT and LoRA: only the adapters and a new task head train. So aptune shards exactly the frozen
part. Every transformer layer (the classes a model lists in ``_no_split_modules``) and then the whole model
go through :func:`torch.distributed.fsdp.fully_shard`: each process keeps 1/N of every frozen tensor, and a
layer's weights are gathered just before its forward (and again for its backward) and dropped after. The
trainable parameters stay whole on every process (``ignored_params``): they are small, and the training loop
averages their gradients itself, as in data-parallel runs (:mod:`aptune.distributed`). That keeps every
structural change APT makes to its adapters (rank growth replaces their tensors) outside FSDP.

Process 0 alone reads the weights; the other processes build the model on the meta device and get their
shards from process 0 (:func:`load_full_state_dict`), so only process 0 ever holds the whole model.

What cannot be done on a sharded model, and what aptune does instead:

- **Physical removal of pruned blocks** slices whole weight matrices, which no process holds. APT keeps its
  pruned blocks *masked* until the end of training (masked and compacted models compute the same function;
  tests/test_masks_compact.py), so the memory of the frozen weights does not shrink during a sharded run.
- **Checkpoints** (``--save-every``) gather the whole weights to process 0, which writes the same checkpoint as
  an unsharded run; ``--resume`` loads them back into every process's shards.
- **The end of training**: the full weights are gathered to process 0's CPU (:func:`full_state_dict`), loaded
  into a freshly built, unsharded copy of the model with the method's state (the resume path,
  :mod:`aptune.checkpoint`), and compacted and saved there. Process 0 needs CPU memory for two copies of the
  model's weights at that moment.
- Methods that prune by slicing weights during training (lora-prune, loraprune, llm-pruner), full fine-tuning
  (every parameter trains: use FSDP through the Trainer), self-distillation (its teacher shares the frozen
  modules) and the kurtosis term (it reads whole weight columns) stop with one line (:func:`check_sharded`).

Every forward of a sharded model is a collective call, so every process runs every evaluation pass
(:func:`aptune.distributed.set_lockstep`) instead of a share of them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from . import distributed
from .config import APTConfig, ConfigError


def check_sharded(method: str, supported: bool, apt: APTConfig, processes: int) -> None:
    """Raise :class:`ConfigError` (one line) for a sharded run aptune cannot do."""
    if processes < 2:
        raise ConfigError(
            "--fsdp shards the frozen weights over processes: launch at least 2 "
            "(torchrun --nproc_per_node N -m aptune.cli train ... or accelerate launch --use_fsdp)"
        )
    if not supported:
        raise ConfigError(
            f"method {method!r} does not run sharded (--fsdp): it slices weight matrices during training, or "
            "trains every weight; sharded runs support apt and lora"
        )
    if apt.distill:
        raise ConfigError("--distill does not run sharded (--fsdp): the teacher shares the frozen modules")
    if apt.one_shot_salience == "taylor":
        raise ConfigError(
            "--one-shot-salience taylor does not run sharded (--fsdp): it needs whole gradients of the weights"
        )
    if apt.use_kurtosis:
        raise ConfigError(
            "--use-kurtosis does not run sharded (--fsdp): the outlier term reads whole weight columns"
        )


def layer_modules(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one at a time: those whose class the model lists in ``_no_split_modules``
    (``LlamaDecoderLayer``, ``BertLayer``, ``T5Block``, ...), outermost first."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if type(module).__name__ in names:
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found


def _embedding_units(model: nn.Module) -> list[nn.Module]:
    """Untied input embeddings and LM head, sharded as units of their own, so that neither is held whole through
    a whole forward (a Llama 3 70B's are 1 B parameters each). Tied ones stay with the root: FSDP cannot split
    one tensor between two units."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    inp = get_in() if get_in is not None else None
    out = get_out() if get_out is not None else None
    if inp is None or out is None or getattr(inp, "weight", None) is getattr(out, "weight", None):
        return []
    return [m for m in (inp, out) if isinstance(m, (nn.Embedding, nn.Linear))]


def shard_model(
    model: nn.Module, device: torch.device | str, replicated: Iterable[nn.Parameter] = ()
) -> None:
    """Shard ``model``'s parameters over the processes of the default group, layer by layer, in place; the
    shards go to ``device`` (a model on the meta device stays there: give it memory with ``to_empty``).

    ``replicated``: parameters kept whole on every process (the ones that train; the loop averages their
    gradients). Modules added later (adapters) hold ordinary tensors and are not sharded either.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (distributed.world_size(),))
    keep = set(replicated)
    for layer in layer_modules(model) + _embedding_units(model):
        fully_shard(layer, mesh=mesh, ignored_params=keep)
    # the root too drops its whole weights (embeddings, LM head) after each forward: FSDP2 keeps them by
    # default, and an evaluation pass has no backward to drop them
    fully_shard(model, mesh=mesh, ignored_params=keep, reshard_after_forward=True)


def local_numel(model: nn.Module) -> dict[str, int]:
    """Parameters this process holds: sharded (its shards only) and whole."""
    from torch.distributed.tensor import DTensor

    sharded = whole = 0
    for p in model.parameters():
        if isinstance(p, DTensor):
            sharded += p.to_local().numel()
        else:
            whole += p.numel()
    return {"sharded_local": sharded, "whole": whole}


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of a sharded ``model``, whole, on process 0's CPU (an empty dict elsewhere).

    A collective call: every process must make it. Gathered one tensor at a time, so no device holds more
    than one whole tensor besides its shards.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def load_full_state_dict(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str = "the checkpoint",
    from_process_0: bool = False,
) -> None:
    """Load whole weights into a sharded ``model``, strictly: each process keeps its shards of them.

    ``from_process_0``: only process 0 holds ``state`` (the others pass ``{}``) and sends each process its
    shards, so no other process ever holds the whole model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from .compact import PrunedModelError

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=from_process_0)
    missing, unexpected = set_model_state_dict(model, state, options=options)
    if missing or unexpected:
        raise PrunedModelError(
            f"weights in {source} do not fit the model's structure (missing {list(missing)[:3]}, "
            f"unexpected {list(unexpected)[:3]})"
        )


__all__ = [
    "check_sharded",
    "full_state_dict",
    "layer_modules",
    "load_full_state_dict",
    "local_numel",
    "shard_model",
]
