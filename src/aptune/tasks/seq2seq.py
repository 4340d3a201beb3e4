"""Sequence to sequence (summarisation and the like): ``AutoModelForSeq2SeqLM`` on source/target rows.

Data is :mod:`aptune.data.seq2seq`. Training is teacher-forced: the model's own loss (cross-entropy of the
target tokens given the source and the previous target tokens). Validation and test generate greedily (at most
``max_target_length`` new tokens) and score ROUGE-1/2/L with Google's ``rouge-score``; the validation metric is
ROUGE-L. Speed: the final model against the dense starting model, alternately, in a teacher-forced forward
pass (batch 32, source ``max_length``, target ``max_target_length``) and in greedy generation
(:data:`GENERATE_TOKENS` new tokens at batch 8).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import distributed
from ..config import ConfigError
from ..evaluate import compare_throughput, quiet_transformers
from .base import Rows, Task, TaskData, load_pretrained, training_loaders

if TYPE_CHECKING:  # pragma: no cover
    from ..train import TrainConfig

GENERATE_BATCH, GENERATE_TOKENS = 8, 32


def check_encoder_decoder(source: str) -> None:
    """A one-line error when ``source``'s config is not an encoder-decoder (before any weights load)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"could not load a model config from {source!r}: {str(e).splitlines()[0]}"
        ) from None
    if not getattr(config, "is_encoder_decoder", False):
        kind = (
            "decoder-only"
            if getattr(config, "is_decoder", False) or "CausalLM" in str(getattr(config, "architectures", ""))
            else "encoder-only or decoder-only"
        )
        raise ConfigError(
            f"the seq2seq task needs an encoder-decoder model (T5, BART, ...); {source!r} is a {kind} "
            f"{config.model_type!r} model. For a decoder-only model use --task causal-lm with prompt/response rows"
        )


def load_seq2seq_model(source: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    check_encoder_decoder(source)
    return load_pretrained("AutoModelForSeq2SeqLM", source, "a seq2seq model", dtype=dtype)


@torch.no_grad()
def generate_texts(
    model: nn.Module,
    loader: Any,
    tokenizer: Any,
    max_new_tokens: int,
    device: torch.device | None = None,
    shared: bool = False,
) -> list[str]:
    """Greedy generations for every row of ``loader``, in row order (``shared``: each process generates for its
    share of the batches and all get every text)."""
    was_training = model.training
    model.eval()
    mine: list[tuple[int, list[str]]] = []
    batches = enumerate(loader)
    for index, batch in distributed.my_share(batches) if shared else batches:
        ids = batch["input_ids"].to(device) if device is not None else batch["input_ids"]
        mask = batch["attention_mask"].to(device) if device is not None else batch["attention_mask"]
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False
        )
        mine.append((index, tokenizer.batch_decode(out, skip_special_tokens=True)))
    model.train(was_training)
    parts = distributed.gather_shares(mine) if shared else mine
    parts.sort(key=lambda p: p[0])
    return [text.strip() for _, texts in parts for text in texts]


class Seq2SeqTask(Task):
    name = "seq2seq"
    metric = "rougeL"
    greater_is_better = True
    auto_class = "AutoModelForSeq2SeqLM"

    def __init__(self) -> None:
        self.tokenizer: Any = None
        self.max_new_tokens = 128

    def load_data(self, config: TrainConfig, tokenizer: Any) -> TaskData:
        from transformers import DataCollatorForSeq2Seq

        from ..data import make_dataloader
        from ..data.seq2seq import encode_seq2seq, load_seq2seq_splits

        if config.train is None and config.data is None:
            raise ConfigError("pass --data NAME_OR_FOLDER, or --train FILE (with --validation FILE)")
        data = load_seq2seq_splits(
            config.data,
            train=config.train,
            validation=config.validation,
            test=config.test,
            text_fields=config.text_fields,
        )
        if "validation" not in data.splits:
            raise ConfigError("a validation split is needed for evaluation and checkpoint selection")
        self.tokenizer, self.max_new_tokens = tokenizer, config.max_target_length
        collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)

        def encode(split: str) -> list[dict[str, Any]]:
            return encode_seq2seq(
                tokenizer,
                data.splits[split],
                config.max_length,
                config.max_target_length,
                config.source_prefix,
            )

        train = Rows(encode("train"))
        loaders = training_loaders(train, config, collate)
        for split in ("validation", "test"):
            if split in data.splits:
                rows = Rows(encode(split), list(data.splits[split]["target"]))
                loaders[split] = make_dataloader(rows, config.eval_batch_size, collate_fn=collate)
        info = {
            "columns": list(data.columns),
            "rows": {split: len(rows) for split, rows in data.splits.items()},
            "source_prefix": config.source_prefix,
            "max_target_length": config.max_target_length,
        }
        return TaskData(loaders, info, data)

    def load_model(self, source: str, data: TaskData, dtype: torch.dtype = torch.float32) -> nn.Module:
        return load_seq2seq_model(source, dtype)

    def scores(
        self, model: nn.Module, loader: Any, device: torch.device | None, shared: bool = False
    ) -> dict:
        from ..data.seq2seq import rouge

        texts = generate_texts(model, loader, self.tokenizer, self.max_new_tokens, device, shared=shared)
        return rouge(texts, loader.dataset.targets)

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> float:
        return self.scores(model, loader, device, shared=True)["rougeL"]

    def final_metrics(
        self, model: nn.Module, data: TaskData, config: TrainConfig, device: torch.device, tokenizer: Any
    ) -> dict[str, Any]:
        metrics: dict[str, Any] = {"seq2seq_data": data.info}
        if "test" in data.loaders:
            scores = self.scores(model, data.loaders["test"], device)
            metrics["test_at_best"] = scores["rougeL"]
            metrics["test_rouge"] = scores
        return metrics

    def compare_speed(
        self, dense_path: str, model: nn.Module, data: TaskData, config: TrainConfig, device: torch.device
    ) -> dict[str, Any]:
        """Teacher-forced forward passes and greedy generation, final against dense, alternately."""
        with quiet_transformers():
            dense = load_seq2seq_model(dense_path)
        target = config.max_target_length

        def forward(m: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Any:
            return m(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :target])

        def generate(m: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Any:
            return m.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=GENERATE_TOKENS,
                min_new_tokens=GENERATE_TOKENS,
                do_sample=False,
            )

        forward_result = compare_throughput(
            dense, model, 32, config.max_length, warmup=2, runs=8, device=device, call=forward
        )
        generation = compare_throughput(
            dense, model, GENERATE_BATCH, config.max_length, warmup=1, runs=4, device=device, call=generate
        )
        del dense
        out = forward_result.report()
        out["generate"] = generation.report()
        out["generate"]["new_tokens"] = GENERATE_TOKENS
        return out
