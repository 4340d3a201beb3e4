"""Causal language modelling: ``AutoModelForCausalLM`` on plain text (packed blocks) or chat records
(assistant tokens only), see :mod:`aptune.data.causal_lm`.

The validation metric is the token-weighted perplexity of the validation split's labelled tokens (lower is
better). The final model is also scored on held-out text with sliding windows (:func:`aptune.evaluate.perplexity`;
window = ``max_length``, stride = ``eval_stride``) and, when ``eval_mc`` names files, on multiple choice by
log-likelihood (:func:`aptune.evaluate.multiple_choice`). Speed: prefill (one forward of batch 8 x 256, logits of
the last position only, as a serving runtime computes them) and decoding (64 new tokens at batch 8 from a 16-token
prompt), compacted against dense, timed alternately.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import distributed
from ..config import ConfigError
from ..evaluate import compare_throughput, quiet_transformers
from .base import Task, TaskData, load_pretrained
from .lm_loss import chunked_loss_unsupported, decoder_body, summed_lm_head_loss

if TYPE_CHECKING:  # pragma: no cover
    from ..train import TrainConfig

PREFILL_BATCH, PREFILL_LENGTH = 8, 256
DECODE_BATCH, DECODE_PROMPT, DECODE_TOKENS = 8, 16, 64


def load_causal_lm(source: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    return load_pretrained("AutoModelForCausalLM", source, "a causal LM", dtype=dtype)


@torch.no_grad()
def labelled_perplexity(
    model: nn.Module, batches: Any, device: torch.device | None = None, shared: bool = False
) -> float:
    """exp of the mean next-token loss over every labelled token (labels != -100) of ``batches``.
    ``shared``: as for :func:`aptune.evaluate.accuracy`, each process scores its share.

    Where :mod:`aptune.tasks.lm_loss` applies (a PEFT model is scored through its base model, which carries its
    adapters), the loss is computed from the last hidden states a chunk of tokens at a time, without the
    vocabulary-sized logits that would otherwise be the largest tensors of an evaluation."""
    was_training = model.training
    model.eval()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    chunked = chunked_loss_unsupported(inner) is None
    total, count = torch.zeros((), dtype=torch.float64), 0
    for batch in distributed.my_share(batches) if shared else batches:
        batch = {k: v.to(device) if device is not None else v for k, v in batch.items()}
        labels = batch.pop("labels")
        if chunked:
            hidden = decoder_body(inner)(**batch).last_hidden_state
            loss, n = summed_lm_head_loss(hidden, inner.lm_head, labels)
        else:
            logits = model(**batch).logits[:, :-1].float()
            target = labels[:, 1:]
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
            )
            n = int((target != -100).sum())
        total += loss.double().cpu()
        count += n
    model.train(was_training)
    if shared:
        total, count = distributed.sum_over_processes([float(total), count])
    if count == 0:
        raise ValueError("no labelled tokens to score")
    return math.exp(min(float(total) / count, 700.0))


class CausalLMTask(Task):
    name = "causal-lm"
    metric = "perplexity"
    greater_is_better = False
    auto_class = "AutoModelForCausalLM"

    def load_data(self, config: TrainConfig, tokenizer: Any) -> TaskData:
        from ..data.causal_lm import (
            detect_lm_format,
            encode_lm_splits,
            lm_collator,
            load_lm_splits,
            make_lm_dataloader,
        )

        if config.train is None and config.data is None:
            raise ConfigError("pass --data NAME_OR_FOLDER, or --train FILE (with --validation FILE)")
        splits = load_lm_splits(
            config.data,
            train=config.train,
            validation=config.validation,
            test=config.test,
            text_field=config.text_fields[0] if config.text_fields else None,
        )
        if "validation" not in splits:
            raise ConfigError("a validation split is needed for evaluation and checkpoint selection")
        fmt = detect_lm_format(splits["train"].column_names, source="the training split")
        encoded = encode_lm_splits(splits, tokenizer, max_length=config.max_length, fmt=fmt)
        for split, rows in encoded.items():
            if len(rows) == 0:
                raise ConfigError(
                    f"the {split} split has no example left with a labelled token at max_length "
                    f"{config.max_length}; raise --max-length"
                )
        collate = lm_collator(tokenizer)
        batch = config.batch_size
        loaders = {
            "train": make_lm_dataloader(
                encoded["train"], batch, shuffle=True, seed=config.seed, collate_fn=collate
            ),
            "calibration": make_lm_dataloader(
                encoded["train"], batch, shuffle=True, seed=config.seed + 1, collate_fn=collate
            ),
        }
        eval_batch = min(config.eval_batch_size, batch)  # logits over the vocabulary are large
        for split in ("validation", "test"):
            if split in encoded:
                loaders[split] = make_lm_dataloader(encoded[split], eval_batch, collate_fn=collate)
        return TaskData(loaders, {"format": fmt}, splits)

    def load_model(self, source: str, data: TaskData, dtype: torch.dtype = torch.float32) -> nn.Module:
        return load_causal_lm(source, dtype)

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> float:
        return labelled_perplexity(model, loader, device, shared=True)

    def final_metrics(
        self, model: nn.Module, data: TaskData, config: TrainConfig, device: torch.device, tokenizer: Any
    ) -> dict[str, Any]:
        from ..evaluate.lm import load_multiple_choice, multiple_choice, perplexity

        metrics: dict[str, Any] = {}
        if "test" in data.loaders:
            metrics["test_perplexity_blocks"] = labelled_perplexity(model, data.loaders["test"], device)
            if data.info["format"] == "text":
                stride = config.eval_stride or config.max_length // 2
                result = perplexity(
                    model,
                    tokenizer,
                    list(data.raw["test"]["text"]),
                    max_length=config.max_length,
                    stride=stride,
                    batch_size=min(config.eval_batch_size, config.batch_size),
                    device=device,
                )
                metrics["test_perplexity"] = result.perplexity
                metrics["test_perplexity_detail"] = result.to_dict()
        for path in config.eval_mc:
            rows = load_multiple_choice(path, limit=config.eval_limit)
            result = multiple_choice(model, tokenizer, rows, batch_size=config.batch_size, device=device)
            metrics.setdefault("multiple_choice", {})[str(path)] = result.to_dict()
        return metrics

    def compare_speed(
        self, dense_path: str, model: nn.Module, data: TaskData, config: TrainConfig, device: torch.device
    ) -> dict[str, Any]:
        """Prefill and decoding throughput of the final model against the dense starting model, alternately."""
        with quiet_transformers():
            dense = load_causal_lm(dense_path)
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

        def prefill_call(m: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Any:
            # what a serving runtime computes for a prompt: every layer over every position, and the logits of
            # the last position only (the next token's); the full-vocabulary head at every position is training's
            return m(input_ids=ids, attention_mask=mask, logits_to_keep=1)

        prefill = compare_throughput(
            dense, model, PREFILL_BATCH, PREFILL_LENGTH, warmup=2, runs=8, device=device, call=prefill_call
        )

        def decode(m: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Any:
            return m.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=DECODE_TOKENS,
                min_new_tokens=DECODE_TOKENS,
                do_sample=False,
                pad_token_id=pad,
            )

        decoding = compare_throughput(
            dense, model, DECODE_BATCH, DECODE_PROMPT, warmup=1, runs=4, device=device, call=decode
        )
        del dense
        out = prefill.report()
        out["prefill_tokens_per_s"] = {
            "dense": prefill.reference.throughput * PREFILL_LENGTH,
            "final": prefill.candidate.throughput * PREFILL_LENGTH,
        }
        out["decode"] = decoding.report()
        out["decode"]["new_tokens"] = DECODE_TOKENS
        out["decode_tokens_per_s"] = {
            "dense": decoding.reference.throughput * DECODE_TOKENS,
            "final": decoding.candidate.throughput * DECODE_TOKENS,
        }
        return out
