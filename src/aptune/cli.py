"""The ``aptune`` command line. Each subcommand is a thin layer over the library.

``aptune train`` has one flag per field of :class:`aptune.train.TrainConfig`, :class:`aptune.APTConfig` and
:class:`aptune.methods.BaselineConfig` (``--target-density`` for ``target_density``, and so on), built from
the dataclasses so they never drift apart. ``--config FILE`` (JSON or YAML) sets the same keys; flags given on the command line win.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import io
import json
import sys
import textwrap
import tokenize
from collections.abc import Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from .arch import UnsupportedModelError
from .assets import AssetError
from .compact import PrunedModelError
from .config import APTConfig, ConfigError
from .masks import MaskError

# Errors that mean "bad input": printed as one line, exit status 2, no traceback.
USER_ERRORS = (
    UnsupportedModelError,
    PrunedModelError,
    MaskError,
    AssetError,
    ConfigError,
    ValueError,
    FileNotFoundError,
)

# Short names the issue tracker and docs use, mapped onto config fields.
ALIASES = {"target_density": ["--density"], "output_dir": ["--output"]}


def _info(args: argparse.Namespace) -> int:
    from .arch import describe, get_spec
    from .assets import minilm_path
    from .budget import StructureShape, param_report
    from .compact import load_pruned, read_structure

    path = Path(args.path) if args.path else minilm_path()
    model = load_pruned(path)
    structure = describe(model)
    shape = StructureShape.of(structure)
    base = getattr(model, "_aptune_base_shape", shape)
    report = param_report(model)
    saved = read_structure(path)
    plain = saved.plain_loadable if saved is not None else True
    facts = get_spec(model).facts(model)  # per-head norms, sliding window, soft-capping, ...
    if args.json:
        out = {
            "path": str(path),
            "model_class": type(model).__name__,
            **report,
            "hidden": shape.hidden,
            "hidden_before": base.hidden,
            "heads": list(shape.heads),
            "heads_before": list(base.heads),
            "kv_heads": list(shape.units),
            "kv_heads_before": list(base.units),
            "neurons": list(shape.neurons),
            "neurons_before": list(base.neurons),
            "plain_from_pretrained": plain,
            "family_facts": facts,
        }
        print(json.dumps(out, indent=2))
        return 0
    print(f"model      {path}")
    print(f"class      {type(model).__name__} (family {report['family']})")
    for key, value in facts.items():
        print(f"  {key:<16} {value}")
    print(f"hidden     {shape.hidden} of {base.hidden} channels")
    grouped = any(a.heads != a.kv_heads for a in base.attention)  # grouped-query attention: show kv heads
    kv_title = f"  {'kv heads':>9}" if grouped else ""
    if len(structure.attention) == len(structure.ffn):  # one attention and one FFN per layer
        print(f"{'layer':>5}  {'heads':>9}{kv_title}  {'FFN neurons':>13}")
        for i, (a, f) in enumerate(zip(structure.attention, structure.ffn, strict=True)):
            kv = f"  {a.num_kv_heads:>4}/{base.units[i]:<4}" if grouped else ""
            print(f"{i:>5}  {a.num_heads:>4}/{base.heads[i]:<4}{kv}  {f.num_neurons:>6}/{base.neurons[i]:<6}")
    else:  # encoder-decoder: self- and cross-attention sites, then FFN sites, by name
        width = max(len(s.name) for s in [*structure.attention, *structure.ffn])
        for i, a in enumerate(structure.attention):
            kv = f"  kv {a.num_kv_heads}/{base.units[i]}" if grouped else ""
            print(f"{a.name:<{width}}  heads {a.num_heads:>4}/{base.heads[i]:<4}{kv}")
        for i, f in enumerate(structure.ffn):
            print(f"{f.name:<{width}}  neurons {f.num_neurons:>6}/{base.neurons[i]:<6}")
    print(
        f"prunable   {report['prunable']:,} of {report['prunable_before']:,} parameters "
        f"(density {report['density']:.3f})"
    )
    print(
        f"other      embeddings {report['embeddings']:,}, task head {report['task_head']:,}, total {report['total']:,}"
    )
    print(f"loading    aptune.load_pruned(path){'; also AutoModel*.from_pretrained(path)' if plain else ''}")
    return 0


# -- eval -------------------------------------------------------------------------------------------------


def _eval_files(paths: Sequence[str]) -> list[tuple[str, Path]]:
    """(kind, file) for each ``--data`` path: "text" (perplexity), "mc" (multiple choice), "classification",
    "qa" (SQuAD rows: exact match and F1) or "seq2seq" (source/target rows: ROUGE).
    A folder stands for its test split (or its validation split when it has no test split)."""
    from .data.seq2seq import SEQ2SEQ_COLUMNS
    from .tasks import peek_columns

    out = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files = {f.stem: f for f in path.iterdir() if f.is_file()}
            chosen = files.get("test") or files.get("validation")
            if chosen is None:
                raise FileNotFoundError(f"{path} holds no test or validation file")
            path = chosen
        if not path.is_file():
            raise FileNotFoundError(f"no such data file: {name}")
        columns = peek_columns(path) or set()
        if {"question", "choices", "answer"} <= columns:
            out.append(("mc", path))
        elif {"question", "context", "answers"} <= columns:
            out.append(("qa", path))
        elif any(set(pair) <= columns for pair in SEQ2SEQ_COLUMNS):
            out.append(("seq2seq", path))
        elif "label" in columns:
            out.append(("classification", path))
        elif "text" in columns:
            out.append(("text", path))
        else:
            raise ConfigError(
                f"{path}: cannot tell what to evaluate from its columns ({', '.join(sorted(columns))}); "
                "expected text (perplexity), question/choices/answer (multiple choice), text/label, "
                "question/context/answers (QA) or source/target (seq2seq)"
            )
    return out


def _eval_task_file(
    kind: str, path: Path, model: Any, tokenizer: Any, device: Any, args: argparse.Namespace
) -> dict:
    """SQuAD exact match and F1 (``kind`` "qa") or ROUGE (``kind`` "seq2seq") of ``model`` on one file, scored as
    the training tasks score their test split (:mod:`aptune.tasks.qa`, :mod:`aptune.tasks.seq2seq`)."""
    from .data import make_dataloader
    from .tasks.base import Rows

    name = type(model).__name__
    if kind == "qa":
        from transformers import DataCollatorWithPadding

        from .data.qa import encode_qa_eval, load_qa_splits
        from .tasks.qa import QAWindowsDataset, qa_scores

        if not name.endswith("ForQuestionAnswering"):
            raise ConfigError(f"{path} is extractive QA data but {name} is not a question-answering model")
        data = load_qa_splits(train=path)
        rows = data.splits["train"]
        if args.limit is not None:
            rows = rows.select(range(min(args.limit, len(rows))))
        length = min(args.max_length, getattr(model.config, "max_position_embeddings", args.max_length))
        windows = encode_qa_eval(tokenizer, rows, length, args.stride if args.stride is not None else 128)
        loader = make_dataloader(
            QAWindowsDataset(windows), args.batch_size, collate_fn=DataCollatorWithPadding(tokenizer)
        )
        return qa_scores(model, loader, device, data.allow_no_answer)
    from transformers import DataCollatorForSeq2Seq

    from .data.seq2seq import encode_seq2seq, load_seq2seq_splits, rouge
    from .tasks.seq2seq import generate_texts

    if not getattr(model.config, "is_encoder_decoder", False):
        raise ConfigError(f"{path} is seq2seq data but {name} is not an encoder-decoder model")
    rows = load_seq2seq_splits(train=path).splits["train"]
    if args.limit is not None:
        rows = rows.select(range(min(args.limit, len(rows))))
    encoded = encode_seq2seq(tokenizer, rows, args.max_length, args.max_new_tokens)
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    loader = make_dataloader(Rows(encoded), args.batch_size, collate_fn=collate)
    texts = generate_texts(model, loader, tokenizer, args.max_new_tokens, device)
    return {**rouge(texts, list(rows["target"])), "rows": len(texts)}


def _eval(args: argparse.Namespace) -> int:
    """Evaluate any saved model folder, dense or pruned, on text (perplexity), multiple choice or
    classification files."""
    import torch

    from .compact import load_pruned
    from .train import load_tokenizer

    files = _eval_files(args.data)
    model = load_pruned(args.model)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    results: dict[str, Any] = {"model": str(args.model), "results": {}}
    for kind, path in files:
        if kind == "classification":
            from .data import PaddingCollator, encode_rows, load_split_files, make_dataloader
            from .evaluate import accuracy

            if not type(model).__name__.endswith("ForSequenceClassification"):
                raise ConfigError(
                    f"{path} is classification data but {type(model).__name__} is not a classifier"
                )
            data = load_split_files(test=path, labels=_model_labels(model))
            encoded = encode_rows(tokenizer, data["test"], data.task, max_length=args.max_length)
            loader = make_dataloader(
                encoded, args.batch_size, collate_fn=PaddingCollator.from_tokenizer(tokenizer)
            )
            results["results"][str(path)] = {"accuracy": accuracy(model, loader, device)}
            continue
        if kind in ("qa", "seq2seq"):
            results["results"][str(path)] = _eval_task_file(kind, path, model, tokenizer, device, args)
            continue
        if not type(model).__name__.endswith("ForCausalLM"):
            raise ConfigError(f"{path} needs a causal language model, got {type(model).__name__}")
        from .evaluate.lm import (
            lm_eval_multiple_choice,
            load_multiple_choice,
            load_texts,
            multiple_choice,
            perplexity,
        )

        if kind == "text":
            texts = load_texts(path, limit=args.limit)
            r = perplexity(
                model,
                tokenizer,
                texts,
                max_length=args.max_length,
                stride=args.stride,
                batch_size=args.batch_size,
                device=device,
                progress=not args.json,
            )
            results["results"][str(path)] = {"perplexity": r.to_dict()}
        else:
            rows = load_multiple_choice(path, limit=args.limit)
            r = multiple_choice(
                model, tokenizer, rows, batch_size=args.batch_size, device=device, progress=not args.json
            )
            entry = {"multiple_choice": r.to_dict()}
            if args.lm_eval:
                entry["lm_eval"] = lm_eval_multiple_choice(
                    model, tokenizer, path, batch_size=args.batch_size, limit=args.limit
                )
            results["results"][str(path)] = entry
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for name, entry in results["results"].items():
        if "perplexity" in entry:
            p = entry["perplexity"]
            print(
                f"{name}: perplexity {p['perplexity']:.3f} ({p['tokens']:,} tokens, window {p['window']}, "
                f"stride {p['stride']})"
            )
        elif "accuracy" in entry:
            print(f"{name}: accuracy {entry['accuracy']:.4f}")
        elif "f1" in entry:
            print(
                f"{name}: F1 {entry['f1']:.2f}, exact match {entry['exact_match']:.2f} ({entry['questions']} questions)"
            )
        elif "rougeL" in entry:
            print(
                f"{name}: ROUGE-1 {entry['rouge1']:.2f}, ROUGE-2 {entry['rouge2']:.2f}, ROUGE-L {entry['rougeL']:.2f}"
            )
        else:
            m = entry["multiple_choice"]
            line = (
                f"{name}: acc {m['acc']:.4f}, acc_norm {m['acc_norm']:.4f} ({m['n']} rows, {m['ties']} tied)"
            )
            if "lm_eval" in entry:
                line += f"; lm-eval acc {entry['lm_eval']['acc']:.4f}, acc_norm {entry['lm_eval']['acc_norm']:.4f}"
            print(line)
    return 0


def _model_labels(model) -> list:
    id2label = getattr(model.config, "id2label", None) or {}
    labels = [id2label[i] for i in sorted(id2label)]
    return [int(x) if str(x).lstrip("-").isdigit() else x for x in labels]


# -- train ------------------------------------------------------------------------------------------------


def _flag_type(annotation: str):
    if "tuple" in annotation:
        return str, "+"
    for name, kind in (("bool", bool), ("float", float), ("int", int), ("str", str)):
        if name in annotation:
            return kind, None
    raise TypeError(f"no CLI type for {annotation}")


# Flags that may be given without a value, and the value they then take.
OPTIONAL_VALUES = {"resume": "latest"}


def field_help(cls) -> dict[str, str]:
    """Each field's comment in ``cls``'s source: the comment on its own lines, else the comment lines right above
    it. The config classes document their fields this way, so ``--help`` reads what the code says."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (a frozen build): flags keep their defaults as help
        return {}
    lines = source.splitlines()
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    alone = {n for n in comments if lines[n - 1].lstrip().startswith("#")}
    body = ast.parse(source).body[0].body
    found: dict[str, str] = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        own = [
            comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments and n not in alone
        ]
        if not own:
            n = node.lineno - 1
            while n in alone:
                own.insert(0, comments[n])
                n -= 1
        if own:
            found[node.target.id] = " ".join(own)
    return found


def _add_config_flags(parser: argparse.ArgumentParser, dataclass_type, group_title: str) -> None:
    group = parser.add_argument_group(group_title)
    described = field_help(dataclass_type)
    for f in fields(dataclass_type):
        kind, nargs = _flag_type(str(f.type))
        names = [f"--{f.name.replace('_', '-')}", *ALIASES.get(f.name, [])]
        default = f.default if f.default is not MISSING else None
        help_text = f"{described[f.name]} " if f.name in described else ""
        help_text = f"{help_text}(default: {default})".replace("%", "%%")
        if kind is bool:
            group.add_argument(
                *names,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        elif f.name in OPTIONAL_VALUES:  # --resume alone means --resume latest
            const = OPTIONAL_VALUES[f.name]
            group.add_argument(
                *names,
                dest=f.name,
                nargs="?",
                const=const,
                default=argparse.SUPPRESS,
                help=f"{described.get(f.name, '')} (alone: {const}; default: {default})".strip().replace(
                    "%", "%%"
                ),
            )
        else:
            group.add_argument(
                *names, dest=f.name, type=kind, nargs=nargs, default=argparse.SUPPRESS, help=help_text
            )


def read_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError("YAML config files need PyYAML: pip install pyyaml (or use JSON)") from None
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys")
    return data


def build_configs(values: dict[str, Any]):
    """Split a flat mapping of keys into (TrainConfig, APTConfig, BaselineConfig); unknown keys are an error."""
    from .methods import BaselineConfig
    from .train import TrainConfig

    train_keys = {f.name for f in fields(TrainConfig)}
    apt_keys = {f.name for f in fields(APTConfig)}
    baseline_keys = {f.name for f in fields(BaselineConfig)}
    unknown = sorted(set(values) - train_keys - apt_keys - baseline_keys)
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
    apt_values = {k: v for k, v in values.items() if k in apt_keys}
    if "adapter_targets" in apt_values:
        apt_values["adapter_targets"] = tuple(apt_values["adapter_targets"])
    train_values = {k: v for k, v in values.items() if k in train_keys}
    for key in ("text_fields", "lora_targets", "eval_mc"):
        if train_values.get(key) is not None:
            train_values[key] = tuple(train_values[key])
    return (
        TrainConfig(**train_values),
        APTConfig(**apt_values),
        BaselineConfig(**{k: v for k, v in values.items() if k in baseline_keys}),
    )


def _collect(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    values: dict[str, Any] = dict(defaults or {})
    if getattr(args, "config", None):
        values.update(read_config_file(args.config))
    values.update({k: v for k, v in vars(args).items() if k not in ("command", "func", "config")})
    return values


def _train(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> int:
    from .train import prepare, resume_source, train

    train_config, apt_config, baseline_config = build_configs(_collect(args, defaults))
    if train_config.resume:
        resume_source(train_config, apt_config, baseline_config)  # a wrong checkpoint fails before loading
    prepared = prepare(train_config)  # every input is checked here, before any training
    report = train(train_config, apt_config, prepared, baseline_config)
    if report:  # empty on every process but the first of a multi-process run
        print_summary(report, train_config.output_dir)
    return 0


def _demo(args: argparse.Namespace) -> int:
    # A short schedule that finishes in minutes on 2 CPU cores; the benchmark uses a longer one.
    return _train(args, defaults=DEMO_DEFAULTS)


DEMO_DEFAULTS: dict[str, Any] = {
    "model": "",  # the packaged all-MiniLM-L6-v2
    "data": "rt-polarity",
    "target_density": 0.4,
    "epochs": 3.0,
    # Self-distillation keeps pruned blocks in place until it ends and adds a teacher pass, so it roughly
    # doubles CPU time here; on this task it did not change accuracy in our runs. `--distill` turns it on.
    "distill": False,
    "output_dir": "runs/demo",
}


def print_summary(report: dict[str, Any], output_dir: str) -> None:
    m = report["metrics"]
    before, after = report["params_before"], report["params_after"]
    metric = m.get("validation_metric", "accuracy")
    rows = [("method", report["method"])]
    if report.get("task", "classification") == "classification":
        rows.append(("test accuracy at best", f"{m['test_at_best']:.4f}" if "test_at_best" in m else "n/a"))
    else:
        if "test_perplexity" in m:
            detail = m["test_perplexity_detail"]
            rows.append(
                (
                    "held-out perplexity",
                    f"{m['test_perplexity']:.3f} (window {detail['window']}, stride {detail['stride']})",
                )
            )
        for name, r in m.get("multiple_choice", {}).items():
            rows.append(
                (
                    f"multiple choice {Path(name).parent.name}/{Path(name).stem}",
                    f"acc {r['acc']:.4f}, acc_norm {r['acc_norm']:.4f} ({r['n']} rows)",
                )
            )
    rows.insert(1, (f"best validation {metric}", f"{m['best_validation']:.4f} (step {m['best_step']})"))
    rows += [
        ("density (prunable params)", f"{report['density']:.3f}"),
        ("prunable params", f"{before['prunable']:,} -> {after['prunable']:,}"),
        ("total params", f"{before['total']:,} -> {after['total']:,}"),
        ("train time", f"{report['train_time_s']:.1f} s (+ {report['eval_time_s']:.1f} s evaluation)"),
        ("peak memory", f"{report['peak_memory_mb']:.0f} MiB ({report['peak_memory_kind']})"),
        ("steps", str(report["steps"])),
    ]
    if "inference" in report:
        from .evaluate import format_speedup

        inf = report["inference"]
        kind = "prefill" if "decode" in inf else "inference"
        rows.append(
            (
                f"{kind}, batch {inf['final']['batch_size']} x {inf['final']['length']}",
                f"{inf['final']['throughput']:.1f}/s vs dense {inf['dense']['throughput']:.1f}/s: "
                f"{format_speedup(inf['speedup'], inf['speedup_spread'], inf['runs'])}",
            )
        )
        if "decode" in inf:
            d, tps = inf["decode"], inf["decode_tokens_per_s"]
            rows.append(
                (
                    f"decoding, batch {d['final']['batch_size']}, {d['new_tokens']} new tokens",
                    f"{tps['final']:.1f} vs dense {tps['dense']:.1f} tokens/s: "
                    f"{format_speedup(d['speedup'], d['speedup_spread'], d['runs'])}",
                )
            )
    rows.append(("saved", f"{output_dir}/model and {output_dir}/report.json"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def build_parser() -> argparse.ArgumentParser:
    from .methods import BaselineConfig
    from .train import TrainConfig

    parser = argparse.ArgumentParser(
        prog="aptune", description="Adaptive Pruning and Tuning for transformers"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="show the structure, parameter counts and density of a model folder")
    info.add_argument("path", nargs="?", help="model folder (default: the packaged all-MiniLM-L6-v2)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=_info)

    for name, func, text in (
        (
            "train",
            _train,
            "fine-tune and prune a classifier or a causal LM; writes OUTPUT/model and OUTPUT/report.json",
        ),
        (
            "demo",
            _demo,
            "APT on the packaged MiniLM and rt-polarity at density 0.4, offline (a few minutes on CPU)",
        ),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", help="JSON or YAML file with config keys (flags win)")
        _add_config_flags(p, TrainConfig, "run")
        _add_config_flags(
            p, APTConfig, "APT (target_density and ffn_multiple also set the baselines' target)"
        )
        _add_config_flags(p, BaselineConfig, "pruning baselines (lora-prune, loraprune, llm-pruner)")
        p.set_defaults(func=func)
    ev = sub.add_parser(
        "eval",
        help="evaluate a saved model (dense or pruned): perplexity, multiple choice or classification accuracy",
        description="Evaluate a saved model folder on data files. Each --data file is scored by what its rows "
        "hold: text (perplexity, token-weighted, sliding windows), question/choices/answer (multiple choice by "
        "log-likelihood: acc and acc_norm as lm-evaluation-harness computes them), or text/label (accuracy). A "
        "folder stands for its test split.",
    )
    ev.add_argument("model", help="model folder (aptune.save_pruned output or any transformers folder)")
    ev.add_argument("--data", nargs="+", required=True, help="data files or folders")
    ev.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    ev.add_argument(
        "--max-length",
        type=int,
        default=1024,
        help="perplexity window; multiple-choice context; QA window (at most the model's positions); seq2seq "
        "source length (default 1024)",
    )
    ev.add_argument(
        "--stride",
        type=int,
        default=None,
        help="perplexity stride (default: the window); QA: tokens shared by a long context's windows (default 128)",
    )
    ev.add_argument(
        "--max-new-tokens", type=int, default=128, help="seq2seq: tokens generated per row (default 128)"
    )
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--limit", type=int, default=None, help="rows per file (default: all)")
    ev.add_argument(
        "--lm-eval", action="store_true", help="also score multiple choice through lm-evaluation-harness"
    )
    ev.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--json", action="store_true", help="print JSON")
    ev.set_defaults(func=_eval)
    from .bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"aptune {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
