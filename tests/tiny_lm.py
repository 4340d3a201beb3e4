"""A tiny offline tokenizer (byte-level BPE with a ChatML chat template) and a tiny LLaMA causal LM to go with it.

Built in-process from a few sentences, so tests of causal-LM data, evaluation and training need no downloads.
"""

from __future__ import annotations

import functools

import torch
from conftest import TINY_DECODER

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


def tiny_bos_tokenizer(chat_template: bool = True, vocab_size: int = 320):
    """:func:`tiny_tokenizer` with a ``<bos>`` token (one id past the trained vocabulary) that every plain encode
    puts first, through a template post-processor, as Gemma's and LLaMA's tokenizers do; its chat template writes
    ``{{ bos_token }}`` first, as theirs do."""
    from tokenizers import processors

    tok = tiny_tokenizer(chat_template=False, vocab_size=vocab_size)
    tok.add_special_tokens({"bos_token": "<bos>"})
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", tok.bos_token_id)]
    )
    if chat_template:
        tok.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
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


WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "cat",
    "sat",
    "on",
    "mat",
    "birds",
    "sing",
    "in",
    "morning",
    "park",
    "ran",
]


def sentence(rng) -> str:
    """A random sentence of 6 to 14 words from :data:`WORDS`."""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + "."


def mc_rows(rng, n: int, choices: int = 3) -> list[dict]:
    """``n`` multiple-choice rows ``{question, choices, answer}`` of random sentences."""
    return [
        {
            "question": sentence(rng),
            "choices": [sentence(rng) for _ in range(choices)],
            "answer": rng.randrange(choices),
        }
        for _ in range(n)
    ]


def write_jsonl(path, rows) -> None:
    import json

    path.write_text("\n".join(json.dumps(r) for r in rows))


def write_lm_folder(
    root, sizes=(("train", 40), ("validation", 6), ("test", 6)), chat: bool = True, mc: int = 8
):
    """Under ``root``: ``model/`` (a tiny causal LM with the tiny tokenizer), ``text/`` (plain-text splits of
    four-sentence documents), ``chat/`` (one user and one assistant turn per row, when ``chat``) and
    ``mc.jsonl`` (``mc`` multiple-choice rows). Returns ``root``."""
    import random

    tok = tiny_tokenizer()
    model = tiny_causal_lm(vocab_size=len(tok), initializer_range=0.05, intermediate_size=64)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rng = random.Random(0)
    for split, n in sizes:
        (root / "text").mkdir(exist_ok=True)
        write_jsonl(
            root / "text" / f"{split}.jsonl",
            [{"id": i, "text": " ".join(sentence(rng) for _ in range(4))} for i in range(n)],
        )
        if chat:
            (root / "chat").mkdir(exist_ok=True)
            turns = [
                {
                    "messages": [
                        {"role": "user", "content": sentence(rng)},
                        {"role": "assistant", "content": sentence(rng)},
                    ]
                }
                for _ in range(n)
            ]
            write_jsonl(root / "chat" / f"{split}.jsonl", turns)
    write_jsonl(root / "mc.jsonl", mc_rows(rng, mc))
    return root


# -- other decoder families (tests/test_families.py) -------------------------------------------------------------

# Shared by every family: 4 query heads in 2 key/value groups, hidden 32, 3 layers, FFN 40.
FAMILY_BASE = {
    **{k: v for k, v in TINY_DECODER.items() if k not in ("num_labels", "tie_word_embeddings")},
    "eos_token_id": 1,
    "bos_token_id": 2,
}
# Per family: the config class, the causal-LM class and what differs from FAMILY_BASE. The Gemma models get a
# head size (12) unrelated to hidden / heads (32 / 4), a sliding window short enough to matter on the test
# sequences (sliding and global layers alternate), and Gemma 2 soft-caps attention and final logits. Phi-3 is shaped
# like Phi-4-mini: fused qkv_proj and gate_up_proj, grouped-query attention, partial rotary embeddings (6 of each
# head's 8 channels) and tied embeddings.
FAMILIES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=12)),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            head_dim=12,
            query_pre_attn_scalar=12,
            sliding_window=4,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=5.0,
        ),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(head_dim=12, query_pre_attn_scalar=12, sliding_window=4, sliding_window_pattern=2),
    ),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(partial_rotary_factor=0.75, tie_word_embeddings=True),
    ),
}


def tiny_family_lm(family: str, seed: int = 0, norm_noise: float = 0.3, **overrides) -> torch.nn.Module:
    """A tiny random causal LM of ``family`` (a key of :data:`FAMILIES`), in eval mode.

    Every norm weight gets noise of scale ``norm_noise``: freshly built Gemma norms are all zero (``1 + weight``
    form) and the others' all one, which would hide a norm computed with the wrong weights or over wrong channels.
    """
    import transformers

    config_name, class_name, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**{**FAMILY_BASE, **extra, **overrides})
    model = getattr(transformers, class_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * norm_noise)
    return model
