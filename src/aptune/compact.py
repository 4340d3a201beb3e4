"""Physical compaction of a masked model, and saving/loading pruned models.

``compact(model)`` deletes the rows and columns of pruned heads, neurons and hidden channels, so the model
becomes a stock transformers model of the same class with smaller tensors. Layers may keep different numbers
of heads and neurons; a sublayer with nothing left is replaced by a module that skips it.

A compacted model is saved as a normal Hugging Face folder (config.json, model.safetensors, the tokenizer if
given) plus ``aptune_structure.json``, the per-layer shape plan. :func:`load_pruned` rebuilds the model from
that folder without any network access.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .arch import ModelStructure, Part, describe, get_spec
from .budget import StructureShape
from .masks import MaskError, StructuralMasks, attached_masks, remove_masks
from .memory import copy_out_of_file_maps

STRUCTURE_FILE = "aptune_structure.json"
FORMAT_VERSION = 1


class PrunedModelError(FileNotFoundError):
    """A folder does not hold a model that aptune can load."""


# -- slicing primitives --------------------------------------------------------------------------------


def _new_param(old: nn.Parameter, value: Tensor) -> nn.Parameter:
    return nn.Parameter(value.detach().clone().contiguous(), requires_grad=old.requires_grad)


def slice_linear(linear: nn.Module, out_idx: Tensor | None = None, in_idx: Tensor | None = None) -> None:
    """Keep only rows ``out_idx`` and columns ``in_idx`` of a linear layer (in place).

    A module that wraps a linear layer (an adapter) can take part by defining
    ``aptune_slice(out_idx, in_idx)``; it is then called instead.
    """
    if hasattr(linear, "aptune_slice"):
        linear.aptune_slice(out_idx, in_idx)
        return
    weight = linear.weight
    w = weight
    if out_idx is not None:
        w = w.index_select(0, out_idx.to(w.device))
        if linear.bias is not None:
            linear.bias = _new_param(linear.bias, linear.bias.index_select(0, out_idx.to(w.device)))
        linear.out_features = len(out_idx)
    if in_idx is not None:
        w = w.index_select(1, in_idx.to(w.device))
        linear.in_features = len(in_idx)
    linear.weight = _new_param(weight, w)


def _slice_embedding(emb: nn.Embedding, idx: Tensor) -> None:
    emb.weight = _new_param(emb.weight, emb.weight.index_select(1, idx.to(emb.weight.device)))
    emb.embedding_dim = len(idx)


def _slice_norm(norm: nn.Module, idx: Tensor) -> None:
    for name in ("weight", "bias"):
        p = getattr(norm, name, None)
        if p is not None:
            setattr(norm, name, _new_param(p, p.index_select(0, idx.to(p.device))))
    if isinstance(norm, (nn.LayerNorm, nn.RMSNorm)):
        norm.normalized_shape = (len(idx),)


def _kept(mask: Tensor) -> Tensor:
    return torch.nonzero(mask == 1).flatten()


def _channels(units: Tensor, width: int) -> Tensor:
    """Channel indices of the given units in a projection whose units are ``width`` consecutive channels."""
    return (units[:, None] * width + torch.arange(width)).flatten()


def _slice_parts(parts: list[Part], kept: dict[str, Tensor]) -> None:
    """Keep rows ``kept[role]`` of each part (indices within the part). A fused projection is sliced once, with
    its parts' kept rows in row order, so it stays fused: for Phi-3's ``qkv_proj`` the kept query rows, then the
    kept key rows, then the kept value rows."""
    rows: dict[int, tuple[nn.Module, list[Tensor]]] = {}
    for part in parts:
        rows.setdefault(id(part.module), (part.module, []))[1].append(kept[part.role] + part.start)
    for module, idx in rows.values():
        slice_linear(module, out_idx=torch.cat(idx))


# -- compaction ----------------------------------------------------------------------------------------


def compact(model: nn.Module, masks: StructuralMasks | None = None) -> nn.Module:
    """Remove masked heads, neurons and hidden channels physically (in place) and return the model.

    ``masks`` defaults to the masks applied to the model with :func:`aptune.apply_masks`; their hooks are
    removed. Masks must be binary (0 or 1). The result is the same model class with smaller tensors; its
    outputs equal those of the masked model.
    """
    spec = get_spec(model)
    if masks is None:
        masks = attached_masks(model)
        if masks is None:
            raise MaskError("compact() needs masks: pass them, or apply them first with aptune.apply_masks")
    structure = describe(model)
    masks.validate_for(structure)
    if not masks.is_binary():
        bad = [t for t in masks.all_tensors() if bool(((t != 0) & (t != 1)).any())]
        raise MaskError(
            f"compact() needs binary masks (0 or 1); found fractional values such as {bad[0][(bad[0] != 0) & (bad[0] != 1)][0].item():g}. "
            "Finish the mask decay (or round the masks) before compacting"
        )
    remove_masks(model)
    if not hasattr(model, "_aptune_base_shape"):
        model._aptune_base_shape = StructureShape.of(structure)

    for site, mask in zip(structure.attention, masks.heads, strict=True):
        if site.num_heads == 0 or bool((mask == 1).all()):
            continue
        units = _kept(mask)  # key/value heads kept, each with its group of query heads
        if len(units) == 0:
            spec.drop_attention(model, site)
            continue
        query = _channels(units, site.unit_width)
        kv = _channels(units, site.head_dim)
        _slice_parts(site.parts, {"q": query, "k": kv, "v": kv})
        slice_linear(site.o, in_idx=query)
        if site.on_resize is not None:
            site.on_resize(site, len(units) * site.group_size, len(units))
        if site.on_prune is not None:
            site.on_prune(site, units)

    for site, mask in zip(structure.ffn, masks.neurons, strict=True):
        if site.num_neurons == 0 or bool((mask == 1).all()):
            continue
        neurons = _kept(mask)
        if len(neurons) == 0:
            spec.drop_ffn(model, site)
            continue
        _slice_parts(site.parts, {"up": neurons, "gate": neurons})
        slice_linear(site.down, in_idx=neurons)

    if not bool((masks.hidden == 1).all()):
        idx = _kept(masks.hidden)
        hidden = describe(model).hidden  # after dropped sublayers are gone
        sliced: dict[int, nn.Parameter] = {}  # embeddings that share one weight (T5's) keep sharing it
        for emb in hidden.embeddings:
            old = emb.weight
            if id(old) in sliced:
                emb.weight, emb.embedding_dim = sliced[id(old)], len(idx)
                continue
            _slice_embedding(emb, idx)
            sliced[id(old)] = emb.weight
        for norm in hidden.norms:
            _slice_norm(norm, idx)
        producers = {id(m) for m in hidden.producers}
        tied = {id(reader): emb for reader, emb in hidden.tied}
        for lin in hidden.readers:
            if id(lin) in tied:  # shares the embedding's (already sliced) weight: tie it again
                lin.weight = tied[id(lin)].weight
                lin.in_features = len(idx)
                continue
            slice_linear(lin, in_idx=idx, out_idx=idx if id(lin) in producers else None)
        readers = {id(m) for m in hidden.readers}
        for lin in hidden.producers:
            if id(lin) not in readers:
                slice_linear(lin, out_idx=idx)

    plan = StructureShape.of(describe(model))
    model._aptune_plain_loadable = spec.update_config(model.config, plan.plan_dict())
    copy_out_of_file_maps(model)  # the dense checkpoint's pages leave with their last user (aptune.memory)
    return model


# -- save and load ------------------------------------------------------------------------------------


@dataclass
class SavedStructure:
    """The content of ``aptune_structure.json``."""

    format: int
    family: str
    model_class: str
    plain_loadable: bool
    shape: dict[str, Any]
    base_shape: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def save_pruned(model: nn.Module, path: str | Path, tokenizer: Any = None) -> Path:
    """Save a (compacted) model as a Hugging Face folder plus ``aptune_structure.json``."""
    path = Path(path)
    structure = describe(model)
    shape = StructureShape.of(structure)
    base = getattr(model, "_aptune_base_shape", shape)
    plain = getattr(model, "_aptune_plain_loadable", shape == base)
    if not plain:
        model.config.aptune_note = (
            "pruned with layers of different shapes: load with aptune.load_pruned(path); see "
            f"{STRUCTURE_FILE}"
        )
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    saved = SavedStructure(
        format=FORMAT_VERSION,
        family=get_spec(model).family,
        model_class=type(model).__name__,
        plain_loadable=bool(plain),
        shape=shape.plan_dict(),
        base_shape=base.plan_dict(),
    )
    (path / STRUCTURE_FILE).write_text(saved.to_json())
    return path


def read_structure(path: str | Path) -> SavedStructure | None:
    f = Path(path) / STRUCTURE_FILE
    if not f.is_file():
        return None
    return SavedStructure(**json.loads(f.read_text()))


def _model_class(name: str):
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None:
        raise PrunedModelError(f"transformers has no model class {name!r}; is the installed version too old?")
    return cls


def _check_folder(path: Path) -> None:
    if not path.exists():
        raise PrunedModelError(f"no such directory: {path}")
    if not (path / "config.json").is_file():
        raise PrunedModelError(f"{path} holds no model (no config.json)")
    if not (path / "model.safetensors").is_file():
        raise PrunedModelError(f"{path} holds no model weights (no model.safetensors)")


def load_pruned(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a model saved by :func:`save_pruned` (or any plain BERT-family folder), offline.

    The model is built from config.json, cut to the saved shape plan, and the safetensors weights are loaded
    strictly, so any mismatch is an error rather than silently re-initialised weights.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig

    path = Path(path)
    _check_folder(path)
    saved = read_structure(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if saved is None:
        architectures = getattr(config, "architectures", None) or ["AutoModel"]
        from transformers import AutoModel

        if architectures[0] == "AutoModel":
            return AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
        return _model_class(architectures[0]).from_pretrained(path, local_files_only=True, dtype=dtype)

    if saved.format > FORMAT_VERSION:
        raise PrunedModelError(f"{path} was saved by a newer aptune (format {saved.format}); please upgrade")
    model = _model_class(saved.model_class)(config)
    masks = masks_for_shape(model, saved.shape)
    compact(model, masks)
    load_state_strictly(model, load_file(str(path / "model.safetensors")), str(path))
    model._aptune_base_shape = StructureShape.from_plan(saved.base_shape)
    model._aptune_plain_loadable = saved.plain_loadable
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def masks_for_shape(model: nn.Module, shape: dict[str, Any]) -> StructuralMasks:
    """Masks that keep the first n heads/neurons/channels of each site, to cut a fresh model to ``shape``."""
    structure: ModelStructure = describe(model)
    target = StructureShape.from_plan(shape)
    if len(target.heads) != len(structure.attention) or len(target.neurons) != len(structure.ffn):
        raise PrunedModelError("the saved shape plan does not match the model's number of layers")

    def first(n: int, total: int) -> Tensor:
        if n > total:
            raise PrunedModelError(f"the saved shape plan asks for {n} of only {total} units")
        return (torch.arange(total) < n).float()

    return StructuralMasks(
        heads=[first(n, s.num_units) for n, s in zip(target.units, structure.attention, strict=True)],
        neurons=[first(n, s.num_neurons) for n, s in zip(target.neurons, structure.ffn, strict=True)],
        hidden=first(target.hidden, structure.hidden.size),
    )


# -- a model's shape, for checkpoints -----------------------------------------------------------------


def shape_and_ranks(model: nn.Module) -> dict[str, Any]:
    """What a fresh copy of the starting model must be cut to before a checkpoint's weights fit it: the
    shape plan of every layer (``None`` for a model aptune has no spec for, e.g. a PEFT wrapper, whose
    shape never changes) and the rank of every aptune adapter."""
    from .adapter import APTLinear
    from .arch import UnsupportedModelError

    try:
        shape = StructureShape.of(describe(model)).plan_dict()
    except UnsupportedModelError:
        shape = None
    ranks = {name: m.rank for name, m in model.named_modules() if isinstance(m, APTLinear)}
    return {"shape": json.loads(json.dumps(shape)), "adapter_ranks": ranks}


def cut_to(model: nn.Module, saved: dict[str, Any]) -> None:
    """Cut ``model`` (the starting model, with its method's adapters attached and no mask hooks) to the saved
    shape and grow its adapters to the saved ranks. Which units survive does not matter: the checkpoint's
    weights replace every tensor afterwards."""
    from .adapter import APTLinear

    if saved["shape"] is not None:
        current = json.loads(json.dumps(StructureShape.of(describe(model)).plan_dict()))
        if current != saved["shape"]:
            compact(model, masks_for_shape(model, saved["shape"]))
    adapters = {name: m for name, m in model.named_modules() if isinstance(m, APTLinear)}
    ranks = saved["adapter_ranks"]
    if set(adapters) != set(ranks):
        missing = sorted(set(ranks) - set(adapters))[:3]
        extra = sorted(set(adapters) - set(ranks))[:3]
        raise PrunedModelError(
            f"the checkpoint's adapters do not match this model's (missing {missing}, unexpected {extra}); "
            "was it written with other --adapter-targets or --lora-targets?"
        )
    for name, rank in ranks.items():
        if rank < adapters[name].rank:
            raise PrunedModelError(f"adapter {name} has rank {adapters[name].rank}, the checkpoint {rank}")
        adapters[name].grow(rank)


def _untie_differing(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Give each name of a parameter that the model shares under several names (a tied language-model head) its
    own parameter when ``state`` holds different tensors for them, as ``from_pretrained`` does. A T5 v1.1 built
    from its config ties ``lm_head`` to the embedding, while its checkpoint has its own head."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for shared in names.values():
        saved = [n for n in shared if n in state]
        for name in saved[1:]:
            if not torch.equal(state[name], state[saved[0]]):
                module_name, _, attr = name.rpartition(".")
                module = model.get_submodule(module_name)
                old = getattr(module, attr)
                setattr(module, attr, nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad))


def load_state_strictly(model: nn.Module, state: dict[str, Tensor], source: str = "the checkpoint") -> None:
    """Load a full model state strictly (tied weights may be stored under either name; a tied pair stored with
    different values is untied first)."""
    _untie_differing(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise PrunedModelError(
            f"weights in {source} do not fit the model's structure (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )


__all__ = [
    "PrunedModelError",
    "compact",
    "cut_to",
    "load_pruned",
    "load_state_strictly",
    "masks_for_shape",
    "read_structure",
    "save_pruned",
    "shape_and_ranks",
    "slice_linear",
]
