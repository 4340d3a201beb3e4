"""APT on the packaged MiniLM and rt-polarity with a plain PyTorch loop (an example of driving APTController).

    python examples/apt_minilm_rt_polarity.py --density 0.4 --epochs 3

Prints validation accuracy per epoch, the density reached and the parameter counts. CPU is fine.
This is an example, not the benchmark: it uses a short schedule.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import aptune
from aptune.assets import minilm_path
from aptune.data import PaddingCollator, encode_splits, load_text_classification, make_dataloader


def evaluate(model, loader) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for batch in loader:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            right += int((logits.argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
    model.train()
    return right / total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--density", type=float, default=0.4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
    data = load_text_classification("rt-polarity")
    encoded = encode_splits(tokenizer, data, max_length=args.max_length)
    collate = PaddingCollator.from_tokenizer(tokenizer)
    train = make_dataloader(
        encoded["train"], args.batch_size, shuffle=True, seed=args.seed, collate_fn=collate
    )
    valid = make_dataloader(encoded["validation"], 128, collate_fn=collate)
    test = make_dataloader(encoded["test"], 128, collate_fn=collate)

    total = args.epochs * len(train)
    config = aptune.APTConfig(target_density=args.density, pruning_end=int(0.6 * total))
    controller = aptune.APTController(model, config, total_steps=total, steps_per_epoch=len(train))
    make_opt = lambda: torch.optim.AdamW(controller.trainable_parameters(), lr=args.lr, weight_decay=0.1)  # noqa: E731
    optimizer = make_opt()
    warmup = int(0.06 * total)
    step, start = 0, time.time()
    model.train()
    for epoch in range(args.epochs):
        for batch in train:
            lr = (
                args.lr
                * min(1.0, (step + 1) / max(1, warmup))
                * max(0.0, (total - step) / max(1, total - warmup))
            )
            for group in optimizer.param_groups:
                group["lr"] = min(lr, args.lr)
            controller.before_forward()
            controller.compute_loss(batch).backward()
            controller.after_backward()
            torch.nn.utils.clip_grad_norm_(controller.trainable_parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if controller.after_step():
                optimizer = make_opt()
        val = evaluate(model, valid)
        controller.observe_validation(val)
        print(
            f"epoch {epoch + 1}: validation {val:.4f}, density {controller.density():.3f}, "
            f"{time.time() - start:.0f} s",
            flush=True,
        )
    model = controller.finish()
    aptune.merge_adapters(model)
    report = aptune.param_report(model)
    print(
        f"test {evaluate(model, test):.4f}; prunable {report['prunable']:,} of {report['prunable_before']:,} "
        f"(density {report['density']:.3f}); heads {aptune.StructureShape.of(aptune.describe(model)).heads}; "
        f"neurons {aptune.StructureShape.of(aptune.describe(model)).neurons}"
    )


if __name__ == "__main__":
    main()
