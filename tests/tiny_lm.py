"""A tiny offline tokenizer (byte-level BPE with a ChatML chat template) and a tiny LLaMA causal LM to go with it.

Built in-process from a few sentences, so tests of causal-LM data, evaluation and training need no downloads.
"""

from __future__ import annotations

import functools

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A language model predicts the next token from the ones before it.",
    "Pruning removes attention heads, neurons and hidden channels.",
    "Question: what is two plus two? Answer: four.",
    "user assistant system: hello, how are you today? I am fine, thank you.",
    "The cat sat on the mat. The dog ran in the park. Birds sing in the morning.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()-",
]


@functools.cache
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(chat_template: bool = True, vocab_size: int = 320):
    """A PreTrainedTokenizerFast: eos = pad = ``<|endoftext|>``, a ChatML template unless ``chat_template`` is False."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        additional_special_tokens=SPECIAL[1:],
    )
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_causal_lm(vocab_size: int | None = None, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random LlamaForCausalLM (GQA: 4 query heads in 2 groups, head size 8) matching :func:`tiny_tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    vocab = vocab_size or len(tiny_tokenizer())
    config = LlamaConfig(
        **{
            "vocab_size": vocab,
            "hidden_size": 32,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "intermediate_size": 48,
            "max_position_embeddings": 256,
            "initializer_range": 0.3,
            "tie_word_embeddings": False,
            "pad_token_id": 0,
            "eos_token_id": 0,
            "bos_token_id": None,
            **overrides,
        }
    )
    return LlamaForCausalLM(config).eval()
