"""Language-model evaluation: strided perplexity, and multiple choice scored by log-likelihood.

:func:`perplexity` scores documents with sliding windows (the usual strided method) and weights every
token alike; when the tokenizer adds a BOS token (Gemma, LLaMA), every window starts with it.
:func:`multiple_choice` scores each choice's continuation by its summed log-probability the way
lm-evaluation-harness (``lm_eval``) scores its ``multiple_choice`` tasks with a Hugging Face model (``HFLM``):
the same context/continuation split, the same left truncation, the same ``acc``/``acc_norm``, except that a
row whose best score is tied or NaN counts as wrong (see :func:`multiple_choice`).
:func:`lm_eval_multiple_choice` runs lm-eval itself on the same file (optional extra ``lm-eval``), and
:func:`evaluate_lm` bundles perplexity and multiple choice into one JSON-serialisable report.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import string
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.causal_lm import resolve_bos

DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"
DEFAULT_CONTEXT_LENGTH = 2048  # lm-eval's default when neither config nor tokenizer gives a context length
TOKENIZER_INFINITY = int(1e30)  # transformers' model_max_length when the tokenizer sets none
PAD_ID = 0  # padding is masked out and never scored, so any valid id does (lm-eval pads with 0 too)
MC_FIELDS = ("question", "choices", "answer")
LM_EVAL_TASK = "aptune_multiple_choice"

Tokens = Sequence[int]
ScoreItem = tuple[Tokens, int]  # (tokens, n): feed tokens[:-1], score the last n of tokens[1:]


# ----------------------------------------------------------------------------------------- shared helpers


def _model_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """``device`` (the model is moved there), or the device of the model's first parameter (CPU if none)."""
    if device is not None:
        device = torch.device(device)
        model.to(device)
        return device
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _logits(output: Any) -> torch.Tensor:
    """The logits of a model output: ``.logits``, the first element of a tuple, or the tensor itself."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is not None:
        return logits
    return output[0]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _batches(order: Sequence[int], batch_size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def score_items(
    model: nn.Module,
    items: Sequence[ScoreItem],
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = False,
    desc: str = "scoring",
) -> list[float]:
    """Summed log-probabilities (float64) of the last ``n`` tokens of each ``(tokens, n)`` item.

    The model reads ``tokens[:-1]``; position ``i`` predicts ``tokens[i + 1]``, and only the last ``n``
    predictions count. Items are sorted longest first, batched, right-padded with an attention mask
    (padding is never scored). Log-softmax runs in float32 on the scored positions only.
    """
    _check_positive(batch_size=batch_size)
    for tokens, n in items:
        if not 1 <= n <= len(tokens) - 1:
            raise ValueError(f"cannot score {n} of {len(tokens) - 1} predictions in an item")
    device = _model_device(model, device)
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    sums = [0.0] * len(items)
    chunks = list(_batches(order, batch_size))
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=desc)
    with _eval_mode(model):
        for chunk in chunks:
            width = max(len(items[i][0]) - 1 for i in chunk)
            ids = torch.full((len(chunk), width), PAD_ID, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                inputs = items[i][0][:-1]
                ids[row, : len(inputs)] = torch.as_tensor(inputs, dtype=torch.long)
                mask[row, : len(inputs)] = 1
            logits = _logits(model(input_ids=ids.to(device), attention_mask=mask.to(device)))
            for row, i in enumerate(chunk):
                tokens, n = items[i]
                length = len(tokens) - 1
                log_probs = logits[row, length - n : length].float().log_softmax(-1)
                targets = torch.as_tensor(tokens[-n:], dtype=torch.long, device=log_probs.device)
                sums[i] = float(log_probs.gather(-1, targets[:, None]).double().sum())
    return sums


# ----------------------------------------------------------------------------------------------- perplexity


@dataclass
class PerplexityResult:
    perplexity: float  # exp(nll)
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored: every token but the first of each document (every text token with a BOS)
    window: int  # max_length: tokens the model reads per window (a BOS included)
    stride: int  # how far each window advances
    documents: int  # documents with at least 2 tokens (the only ones that have something to score)
    bos: bool = False  # every window started with the BOS token

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Window:
    """The model reads ``ids[begin:end]`` for ``ids[begin + 1 : end + 1]``; the last ``scored`` count."""

    begin: int
    end: int
    scored: int


def sliding_windows(length: int, max_length: int, stride: int) -> list[Window]:
    """Windows over a document of ``length`` tokens that score each token but the first exactly once.

    Window ``k`` reads up to ``max_length`` tokens from ``k * stride`` and scores only the predictions no
    earlier window made; the tokens before them in the window are context. ``stride == max_length`` gives
    disjoint windows (each token of a window is context for the next one's prediction).
    """
    _check_positive(max_length=max_length, stride=stride)
    if stride > max_length:
        raise ValueError(f"stride ({stride}) must be <= max_length ({max_length}): tokens would go unscored")
    last = length - 1  # targets are ids[1..last]
    windows: list[Window] = []
    scored_to, begin = 0, 0
    while scored_to < last:
        end = min(begin + max_length, last)
        windows.append(Window(begin, end, end - scored_to))
        scored_to, begin = end, begin + stride
    return windows


def tokenize_documents(
    tokenizer: Any, texts: Sequence[str | Tokens], bos_id: int | None = None
) -> list[list[int]]:
    """Token ids per document: strings are tokenized without special tokens (no EOS is appended), sequences
    of ints (pre-tokenized documents) are taken as they are; ``bos_id`` (when not None) is then put first in
    each document that does not already start with it."""
    documents = []
    for text in texts:
        if isinstance(text, str):
            if tokenizer is None:
                raise ValueError("a text was given as a string but tokenizer is None")
            ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        else:
            ids = [int(token) for token in text]
        if bos_id is not None and ids[:1] != [bos_id]:
            ids.insert(0, bos_id)
        documents.append(ids)
    return documents


def _window_tokens(ids: Tokens, window: Window, bos_id: int | None) -> list[int]:
    """``ids[begin : end + 1]`` (what a window reads, then its last target), the first token replaced by
    ``bos_id`` in every window but a document's first (which starts with it already)."""
    tokens = list(ids[window.begin : window.end + 1])
    if bos_id is not None and window.begin > 0:
        tokens[0] = bos_id
    return tokens


def _safe_exp(x: float) -> float:
    return math.inf if x > 709.0 else math.exp(x)  # math.exp overflows past ~709.78


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str | Tokens],
    *,
    max_length: int = 1024,
    stride: int | None = None,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    progress: bool = False,
    bos: bool | None = None,
) -> PerplexityResult:
    """Token-weighted perplexity of ``model`` over ``texts`` with sliding windows.

    Each text is tokenized on its own, without special tokens (see :func:`tokenize_documents`; ``tokenizer``
    may be None when all texts are token ids) and scored with :func:`sliding_windows` of ``max_length``
    tokens advancing by ``stride`` tokens (default ``max_length``: disjoint windows). Every token but the
    first of each document is scored exactly once, by the first window that reaches it; documents with
    fewer than 2 tokens are skipped. The NLL is summed in float64 and perplexity = exp(total NLL / tokens).
    ``max_length`` should not exceed the model's context length. The model's train/eval mode is restored;
    ``device`` moves the model.

    With a BOS token (``bos=None``, the default: when the tokenizer adds one to a plain encode; ``True`` or
    ``False`` force it, see :func:`aptune.data.causal_lm.resolve_bos`), a document is ``<bos>`` followed by
    its text tokens: every text token is scored once (the first one predicted from ``<bos>`` alone), the BOS
    never. Every window starts with ``<bos>``: the windows are the ones above, but each window after a
    document's first reads ``<bos>`` in place of its first token (context only: that window never scores
    it). So a window reads ``<bos>`` and at most ``max_length - 1`` text tokens, and windows advance by
    ``stride`` text tokens. With ``stride == max_length`` (disjoint windows) the first token each later window
    scores is predicted from ``<bos>`` alone (without a BOS, from the one text token before it).

    Raises:
        ValueError: no texts, ``stride > max_length``, sizes < 1, no text with 2 tokens or more (1 text
            token or more with a BOS), or ``bos=True`` with a tokenizer that has no BOS token.
    """
    if len(texts) == 0:
        raise ValueError("perplexity() got no texts")
    stride = max_length if stride is None else stride
    _check_positive(max_length=max_length, stride=stride, batch_size=batch_size)
    if stride > max_length:
        raise ValueError(f"stride ({stride}) must be <= max_length ({max_length}): tokens would go unscored")
    bos_id = resolve_bos(tokenizer, bos)
    documents = [ids for ids in tokenize_documents(tokenizer, texts, bos_id) if len(ids) >= 2]
    if not documents:
        raise ValueError("every text has fewer than 2 tokens: nothing to score")
    items = [
        (_window_tokens(ids, w, bos_id), w.scored)
        for ids in documents
        for w in sliding_windows(len(ids), max_length, stride)
    ]
    sums = score_items(
        model, items, batch_size=batch_size, device=device, progress=progress, desc="perplexity"
    )
    tokens = sum(n for _, n in items)
    nll = -math.fsum(sums) / tokens
    return PerplexityResult(
        _safe_exp(nll), nll, tokens, max_length, stride, len(documents), bos_id is not None
    )


# ------------------------------------------------------------------------------------------ multiple choice


@dataclass
class MultipleChoiceResult:
    acc: float  # share of rows whose unique best log-likelihood is the answer
    acc_norm: float  # the same with log-likelihood / len(choice) in characters
    n: int  # rows
    ties: int  # rows whose best log-likelihood is shared by two choices or more (counted wrong)
    ties_norm: int  # the same for the length-normalised score (counted wrong for acc_norm)
    nan: int  # rows with a NaN score (counted wrong)
    scores: list[list[float]] = field(default_factory=list, repr=False)  # log-likelihood per row and choice

    def to_dict(self) -> dict:
        """The summary (without the per-choice ``scores``)."""
        return {k: v for k, v in asdict(self).items() if k != "scores"}


def model_context_length(
    model: nn.Module, tokenizer: Any = None, default: int = DEFAULT_CONTEXT_LENGTH
) -> int:
    """The model's context length as lm-eval resolves it: ``text_config`` or config ``n_positions``,
    ``max_position_embeddings``, ``n_ctx``; then the tokenizer's ``model_max_length``; then ``default``."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit != TOKENIZER_INFINITY:
        return int(limit)
    return default


def _prefix_token_id(tokenizer: Any) -> int | None:
    """lm-eval's prefix token: BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _lm_eval_encode(tokenizer: Any, text: str, prefix_text: str | None) -> list[int]:
    """``HFLM.tok_encode``: default special tokens, or none when the text starts with the prefix's text."""
    if prefix_text is not None and text.startswith(prefix_text):
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(text))


def encode_choice(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split as lm-eval's ``HFLM.loglikelihood`` splits them.

    Trailing whitespace of the context moves to the continuation; ``context + continuation`` and the context
    are encoded whole (with the tokenizer's default special tokens, e.g. a BOS, unless the text already
    starts with the prefix token's text) and the continuation is what the whole has past the context's
    length. An empty context becomes the prefix token (BOS, else EOS).
    """
    prefix_id = _prefix_token_id(tokenizer)
    if context == "":
        continuation_ids = list(tokenizer.encode(continuation, add_special_tokens=False))
        if continuation_ids and continuation_ids[0] == prefix_id:
            return continuation_ids[:1], continuation_ids[1:]
        return [prefix_id], continuation_ids
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    if stripped == "":
        raise ValueError(f"the context {context!r} is only whitespace")
    prefix_text = tokenizer.decode(prefix_id) if prefix_id is not None else None
    whole = _lm_eval_encode(tokenizer, stripped + continuation, prefix_text)
    context_ids = _lm_eval_encode(tokenizer, stripped, prefix_text)
    return context_ids, whole[len(context_ids) :]


def format_context(template: str, row: Mapping[str, Any], where: str = "a row") -> str:
    """``template.format_map(row)`` with a clear error for a field the row lacks."""
    try:
        return template.format_map(row)
    except KeyError as exc:
        raise ValueError(f"template field {exc.args[0]!r} is not in {where}") from None


def _check_row(row: Mapping[str, Any], where: str) -> None:
    for name in MC_FIELDS:
        if row.get(name) is None:
            raise ValueError(f"{where} has no {name!r} field")
    choices, answer = row["choices"], row["answer"]
    if isinstance(choices, str) or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"{where}: 'choices' must be a list of strings")
    if len(choices) < 2:
        raise ValueError(f"{where} has {len(choices)} choice(s); multiple choice needs at least 2")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f"{where}: answer {answer!r} is not an index into its {len(choices)} choices")


def _choice_items(tokenizer: Any, context: str, choices: Sequence[str], max_length: int) -> list[ScoreItem]:
    """One item per choice: ``context + " " + choice`` ids, left-truncated to ``max_length + 1`` (lm-eval)."""
    items = []
    for choice in choices:
        context_ids, continuation_ids = encode_choice(tokenizer, context, " " + choice)
        if not 1 <= len(continuation_ids) <= max_length:
            raise ValueError(
                f"choice {choice!r} has {len(continuation_ids)} tokens (1 to {max_length} allowed)"
            )
        items.append(((context_ids + continuation_ids)[-(max_length + 1) :], len(continuation_ids)))
    return items


def _per_char(score: float, length: int) -> float:
    """``score / length`` as NumPy divides (lm-eval's acc_norm): x / 0 is -inf, inf or NaN."""
    if length:
        return score / length
    if math.isnan(score) or score == 0:
        return math.nan
    return math.copysign(math.inf, score)


def unique_best(values: Sequence[float]) -> int | None:
    """The index of the largest value, or None when it is shared or any value is NaN."""
    if any(math.isnan(v) for v in values):
        return None
    top = max(values)
    best = [i for i, v in enumerate(values) if v == top]
    return best[0] if len(best) == 1 else None


def multiple_choice(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    template: str = DEFAULT_TEMPLATE,
    max_length: int | None = None,
    progress: bool = False,
) -> MultipleChoiceResult:
    """Zero-shot multiple-choice accuracy by log-likelihood, as lm-eval's ``multiple_choice`` tasks.

    Each row is ``{"question", "choices": [str, ...], "answer": index}``. The context is
    ``template.format_map(row)``, each continuation ``" " + choice``, split into tokens by
    :func:`encode_choice`; its score is the summed log-probability of the continuation tokens, the input
    left-truncated to ``max_length`` (default: the model's context, as lm-eval resolves it).
    ``acc`` picks the best score, ``acc_norm`` the best score per character of the choice (without the
    space). Unlike lm-eval, which takes the first index, a row whose best score is tied or NaN is wrong (a
    broken model that scores every choice alike must not look accurate); such rows are counted in
    ``ties``/``ties_norm``/``nan``. Ties are exact float equality. A BOS token comes first exactly as in
    lm-eval's ``HFLM`` (which leaves ``add_bos_token`` unset by default): from the tokenizer's default
    special tokens, so a tokenizer that adds one (Gemma, LLaMA) puts it before every context, unless the
    context already starts with its text; left truncation of a context too long for ``max_length`` drops it,
    as in lm-eval.
    """
    if len(rows) == 0:
        raise ValueError("multiple_choice() got no rows")
    _check_positive(batch_size=batch_size, max_length=max_length)
    max_length = max_length or model_context_length(model, tokenizer)
    items: list[ScoreItem] = []
    for index, row in enumerate(rows, start=1):
        where = f"row {index}"
        _check_row(row, where)
        items += _choice_items(tokenizer, format_context(template, row, where), row["choices"], max_length)
    sums = score_items(model, items, batch_size=batch_size, device=device, progress=progress, desc="choices")
    scores, start = [], 0
    for row in rows:
        scores.append(sums[start : start + len(row["choices"])])
        start += len(row["choices"])
    return _tally(rows, scores)


def _tally(rows: Sequence[Mapping[str, Any]], scores: list[list[float]]) -> MultipleChoiceResult:
    right = right_norm = ties = ties_norm = nan = 0
    for row, row_scores in zip(rows, scores, strict=True):
        if any(math.isnan(s) for s in row_scores):
            nan += 1
            continue
        normed = [_per_char(s, len(c)) for s, c in zip(row_scores, row["choices"], strict=True)]
        best, best_norm = unique_best(row_scores), unique_best(normed)
        ties += best is None
        ties_norm += best_norm is None
        right += best == row["answer"]
        right_norm += best_norm == row["answer"]
    n = len(rows)
    return MultipleChoiceResult(right / n, right_norm / n, n, ties, ties_norm, nan, scores)


def _load_json_rows(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file, read with ``datasets`` (progress bars off), the first ``limit`` of them."""
    _check_positive(limit=limit)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if not path.read_text(encoding="utf-8").strip():
        raise ValueError(f"{path} is empty")
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("reading JSON lines needs the datasets package: pip install datasets") from exc
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset("json", data_files=str(path.resolve()), split="train")
    except Exception as exc:
        raise ValueError(f"could not read {path} as JSON lines ({exc.__class__.__name__}: {exc})") from exc
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    if limit is not None:
        table = table.select(range(min(limit, len(table))))
    return [dict(row) for row in table]


def load_multiple_choice(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Multiple-choice rows of a JSON-lines file: ``question``, ``choices``, ``answer`` (index), other fields.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an empty file, a row without one of the fields, fewer than 2 choices, an answer that is
            not an index into the choices (one line naming the file and row).
    """
    rows = _load_json_rows(path, limit)
    if not rows:
        raise ValueError(f"{path} has no rows")
    for index, row in enumerate(rows, start=1):
        _check_row(row, f"row {index} of {path}")
    return rows


# ---------------------------------------------------------------------------------------- lm-eval harness


def jinja_template(template: str) -> str:
    """The Jinja equivalent of a ``str.format`` template with plain ``{field}`` slots (for lm-eval's YAML)."""
    if "\r" in template:
        raise ValueError("templates with carriage returns cannot be passed to lm-eval (Jinja rewrites them)")
    parts = []
    for literal, name, spec, conversion in string.Formatter().parse(template):
        if literal:
            parts.append(f"{{% raw %}}{literal}{{% endraw %}}" if "{" in literal else literal)
        if name is None:
            continue
        if spec or conversion or not name.isidentifier():
            raise ValueError(f"template slot {{{name}}} must be a plain field name to be passed to lm-eval")
        parts.append("{{ " + name + " }}")
    return "".join(parts)


def _task_config(path: Path, template: str) -> dict[str, Any]:
    """An lm-eval task config scoring a JSON-lines file as :func:`multiple_choice` does."""
    return {
        "task": LM_EVAL_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": jinja_template(template),
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


@contextlib.contextmanager
def _quiet(loggers: Sequence[str] = ("lm_eval",)) -> Iterator[None]:
    """Loggers at ERROR and ``datasets`` progress bars off inside; both restored afterwards."""
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        import datasets

        bars_were_on = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
    except ImportError:
        bars_were_on = False
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)
        if bars_were_on:
            datasets.enable_progress_bars()


def lm_eval_multiple_choice(
    model: nn.Module,
    tokenizer: Any,
    path: str | Path,
    *,
    batch_size: int = 16,
    limit: int | None = None,
    template: str = DEFAULT_TEMPLATE,
    progress: bool = False,
) -> dict[str, float | int]:
    """lm-eval's own ``acc`` and ``acc_norm`` on a JSON-lines file of :func:`load_multiple_choice` rows.

    Writes a temporary task YAML (``dataset_path: json``, ``doc_to_text`` = ``template`` in Jinja,
    ``doc_to_choice: choices``, ``doc_to_target: answer``) and runs ``lm_eval.simple_evaluate`` zero-shot
    with ``HFLM(pretrained=model, tokenizer=tokenizer)``, no built-in tasks indexed, no global seeds set,
    lm-eval's logging at ERROR and, unless ``progress``, stderr (its progress bars) swallowed while it runs.
    Nothing is downloaded (a local file and a model in memory); on an air-gapped machine where network
    checks hang, set ``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1`` before starting Python (those libraries
    read them on import; setting them here would switch the hub off for the rest of the process). The
    model's train/eval mode is restored. lm-eval counts a tied row as right when the first tied choice is
    the answer; :func:`multiple_choice` does not.

    Raises:
        ImportError: lm-eval is not installed.
    """
    try:
        import lm_eval
        import yaml
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ImportError(
            "lm_eval_multiple_choice() needs lm-evaluation-harness: pip install 'aptune[lm-eval]'"
        ) from exc
    path = Path(path).resolve()
    load_multiple_choice(path, limit)  # the same checks and clear errors before lm-eval sees the file
    config = _task_config(path, template)
    was_training = model.training
    hide_bars = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    with tempfile.TemporaryDirectory(prefix="aptune-lm-eval-") as folder, _quiet(), hide_bars:
        Path(folder, f"{LM_EVAL_TASK}.yaml").write_text(
            yaml.safe_dump(config, sort_keys=False), encoding="utf-8"
        )
        try:
            results = lm_eval.simple_evaluate(
                model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
                tasks=[LM_EVAL_TASK],
                num_fewshot=0,
                limit=limit,
                bootstrap_iters=0,
                log_samples=False,
                task_manager=TaskManager(include_path=folder, include_defaults=False),
                random_seed=None,
                numpy_random_seed=None,
                torch_random_seed=None,
            )
        finally:
            model.train(was_training)
    metrics = results["results"][LM_EVAL_TASK]
    return {
        "acc": float(metrics["acc,none"]),
        "acc_norm": float(metrics["acc_norm,none"]),
        "n": int(results["n-samples"][LM_EVAL_TASK]["effective"]),
    }


# ----------------------------------------------------------------------------------------------- CLI helper


def load_texts(path: str | Path, field: str = "text", limit: int | None = None) -> list[str]:
    """The ``field`` of each row of a JSON-lines file (the first ``limit`` rows)."""
    rows = _load_json_rows(path, limit)
    for index, row in enumerate(rows, start=1):
        if not isinstance(row.get(field), str):
            raise ValueError(f"row {index} of {path} has no {field!r} text field")
    return [row[field] for row in rows]


def _names(paths: Sequence[str | Path]) -> list[str]:
    """File stems, or whole paths where two stems clash."""
    stems = [Path(p).stem for p in paths]
    return [stem if stems.count(stem) == 1 else str(p) for stem, p in zip(stems, paths, strict=True)]


def evaluate_lm(
    model: nn.Module,
    tokenizer: Any,
    *,
    text_file: str | Path | None = None,
    mc_files: Sequence[str | Path] = (),
    max_length: int = 1024,
    stride: int | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    limit: int | None = None,
    text_field: str = "text",
    template: str = DEFAULT_TEMPLATE,
    progress: bool = False,
    bos: bool | None = None,
) -> dict[str, Any]:
    """Perplexity on the ``text_field`` of a JSON-lines file and multiple choice on each of ``mc_files``.

    ``limit`` takes the first rows of every file; ``max_length``/``stride``/``bos`` set the perplexity
    windows (see :func:`perplexity`; multiple choice uses the model's context and puts a BOS first as
    lm-eval does). Returns a JSON-serialisable dict::

        {"perplexity": {"file": ..., "perplexity": ..., "nll": ..., "tokens": ..., ...} or None,
         "multiple_choice": {name: {"file": ..., "acc": ..., "acc_norm": ..., "n": ..., ...}}}

    where ``name`` is the file's stem (its path when two stems clash).
    """
    if text_file is None and not mc_files:
        raise ValueError("evaluate_lm() needs a text_file, mc_files or both")
    report: dict[str, Any] = {"perplexity": None, "multiple_choice": {}}
    if text_file is not None:
        texts = load_texts(text_file, text_field, limit)
        result = perplexity(
            model,
            tokenizer,
            texts,
            max_length=max_length,
            stride=stride,
            batch_size=batch_size,
            device=device,
            progress=progress,
            bos=bos,
        )
        report["perplexity"] = {"file": str(text_file), **result.to_dict()}
    for name, path in zip(_names(mc_files), mc_files, strict=True):
        rows = load_multiple_choice(path, limit)
        result = multiple_choice(
            model, tokenizer, rows, batch_size=batch_size, device=device, template=template, progress=progress
        )
        report["multiple_choice"][name] = {"file": str(path), **result.to_dict()}
    return report
