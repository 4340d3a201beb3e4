"""Tiny random models built from configs: no downloads, fast on CPU."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import BertConfig, LlamaConfig, MistralConfig, Qwen2Config, RobertaConfig

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=40,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    initializer_range=0.3,  # large enough that outputs differ clearly between structures
    num_labels=3,
)


# LLaMA-family decoders with grouped-query attention: 4 query heads in 2 groups of 2, head size 8
TINY_DECODER = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=40,
    max_position_embeddings=64,
    initializer_range=0.3,
    num_labels=3,
    pad_token_id=0,
    tie_word_embeddings=False,
)
DECODER_CONFIGS = {"Llama": LlamaConfig, "Qwen2": Qwen2Config, "Mistral": MistralConfig}


def tiny_model(class_name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random model of a BERT- or LLaMA-family class, in eval mode."""
    torch.manual_seed(seed)
    for prefix, decoder_config in DECODER_CONFIGS.items():
        if class_name.startswith(prefix):
            config = decoder_config(**{**TINY_DECODER, **overrides})
            return getattr(transformers, class_name)(config).eval()
    config_cls = RobertaConfig if class_name.startswith("Roberta") else BertConfig
    extra = {"pad_token_id": 1} if class_name.startswith("Roberta") else {}
    if "QuestionAnswering" in class_name:
        extra["num_labels"] = 2  # start and end logits
    config = config_cls(**{**TINY, **extra, **overrides})
    return getattr(transformers, class_name)(config).eval()


def tiny_batch(seed: int = 1, batch: int = 3, length: int = 9, vocab: int = 97) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, length), generator=g)
    attention = torch.ones(batch, length, dtype=torch.long)
    attention[1, 6:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": attention}


def first_output(out) -> torch.Tensor:
    for name in ("logits", "start_logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            if name == "start_logits":
                return torch.cat([out.start_logits, out.end_logits], dim=-1)
            return getattr(out, name)
    raise AssertionError("model output has no logits")


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    return tiny_batch()
