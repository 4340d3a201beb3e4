"""The pruning baselines: importance criteria against brute force, Mask-Tuning's pieces, budgets end to end."""

from __future__ import annotations

import copy
import importlib
import json

import pytest
import torch
from conftest import tiny_batch, tiny_model
from test_train_cli import tiny_folder, write_task  # noqa: F401  (fixture)

import aptune
from aptune.adapter import APTLinear, add_adapters
from aptune.arch import describe
from aptune.budget import StructureShape, count_prunable, head_cost, neuron_cost
from aptune.cli import main
from aptune.masks import StructuralMasks, remove_masks
from aptune.methods import ALL_ROLES, REGISTRY, MethodInfo, lr_factor, register
from aptune.methods.llm_pruner.importance import taylor_scores
from aptune.methods.loraprune.importance import lora_guided_scores
from aptune.methods.loraprune.method import cubic_density
from aptune.methods.mask_tuning.fisher import mask_fisher
from aptune.methods.mask_tuning.rescale import rescale_outputs
from aptune.methods.mask_tuning.search import rearrange, removal_cost
from aptune.train import TrainConfig


def labelled(seed=1, batch=3):
    b = tiny_batch(seed=seed, batch=batch)
    b["labels"] = torch.arange(batch) % 3
    return b


def group_members(site, kind):
    """(linear, 'row'|'col', indices) for every piece of each block's group, listed block by block."""
    if kind == "head":
        hd = site.head_dim
        return [
            [(p, "row", range(h * hd, (h + 1) * hd)) for p in (site.q, site.k, site.v)]
            + [(site.o, "col", range(h * hd, (h + 1) * hd))]
            for h in range(site.num_heads)
        ]
    return [
        [(p, "row", [j]) for p in site.inputs] + [(site.down, "col", [j])] for j in range(site.num_neurons)
    ]


def brute_group_sum(structure, score_of):
    """Sum ``score_of(linear, i, j)`` over every weight (and, for rows, bias entry ``j = None``) of each group."""
    out = []
    for kind, sites in (("head", structure.attention), ("neuron", structure.ffn)):
        per_site = []
        for site in sites:
            totals = []
            for members in group_members(site, kind):
                total = 0.0
                for linear, how, idx in members:
                    out_f, in_f = linear.weight.shape
                    for a in idx:
                        if how == "row":
                            total += sum(score_of(linear, a, j) for j in range(in_f))
                            total += score_of(linear, a, None)
                        else:
                            total += sum(score_of(linear, i, a) for i in range(out_f))
                totals.append(total)
            per_site.append(torch.tensor(totals, dtype=torch.float64))
        out.append(per_site)
    return out


def test_loraprune_importance_equals_brute_force():
    model = tiny_model(
        "BertForSequenceClassification", hidden_size=16, intermediate_size=8, num_attention_heads=2
    )
    adapters = add_adapters(model, ALL_ROLES, rank=3)
    torch.manual_seed(3)
    for a in adapters:  # non-zero B, so the merged weight differs from the base weight
        a.lora_B.data.normal_(0, 0.2)
    for a in adapters:  # the applied weight's true gradient, for the independent computation below
        a.base.weight.requires_grad_(True)
    model(**labelled()).loss.backward()
    heads, neurons = lora_guided_scores(model)

    # brute force: G_B = s G_W A^T and G_A = s B^T G_W, so G_B A + B G_A = s (G_W A^T A + B B^T G_W)
    est = {}
    for a in adapters:
        g_w = a.base.weight.grad.double()
        A, B = a.lora_A.detach().double(), a.lora_B.detach().double()
        est[id(a)] = (a.scale * (g_w @ A.T @ A + B @ B.T @ g_w), a.merged_weight().double())

    def score(linear, i, j):
        if not isinstance(linear, APTLinear) or j is None:
            return 0.0
        g, w = est[id(linear)]
        return abs(float(w[i, j] * g[i, j]))

    want_heads, want_neurons = brute_group_sum(describe(model), score)
    for got, want in zip(heads + neurons, want_heads + want_neurons, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
    assert all(bool((h > 0).all()) for h in heads)


def test_taylor_importance_equals_brute_force_and_restores_the_model():
    model = tiny_model(
        "BertForSequenceClassification", hidden_size=16, intermediate_size=8, num_attention_heads=2
    )
    batches = [labelled(1), labelled(2)]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    heads, neurons = taylor_scores(model, batches)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())

    reference = copy.deepcopy(model)
    for b in batches:
        reference(**b).loss.backward()
    ref = {id(m): m for m in reference.modules()}
    own = dict(zip([id(m) for m in model.modules()], reference.modules(), strict=True))
    assert len(ref) == len(own)

    def score(linear, i, j):
        twin = own[id(linear)]
        if j is None:
            return abs(float(twin.bias[i].detach() * twin.bias.grad[i]))
        return abs(float(twin.weight[i, j].detach() * twin.weight.grad[i, j]))

    want_heads, want_neurons = brute_group_sum(describe(model), score)
    for got, want in zip(heads + neurons, want_heads + want_neurons, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-10)


def test_mask_fisher_is_the_sum_of_per_example_outer_products():
    model = tiny_model("BertForSequenceClassification")
    batch = labelled(batch=3)
    fisher = mask_fisher(model, [batch])
    assert fisher.examples == 3
    structure = describe(model)
    for i, site in enumerate(structure.attention):
        want = torch.zeros(site.num_heads, site.num_heads, dtype=torch.float64)
        for e in range(3):
            one = {k: v[e : e + 1] for k, v in batch.items()}
            m = torch.ones(site.num_heads, requires_grad=True)
            hook = site.o.register_forward_pre_hook(
                lambda mod, args, m=m, hd=site.head_dim: (args[0] * m.repeat_interleave(hd),)
            )
            (g,) = torch.autograd.grad(model(**one).loss, [m])
            hook.remove()
            want += torch.outer(g.double(), g.double())
        torch.testing.assert_close(fisher.heads[i], want, rtol=1e-4, atol=1e-12)
    assert all(
        f.shape == (s.num_neurons, s.num_neurons) for f, s in zip(fisher.neurons, structure.ffn, strict=True)
    )


def test_rearrangement_keeps_the_count_and_never_costs_more():
    torch.manual_seed(0)
    for _ in range(20):
        g = torch.randn(50, 6, dtype=torch.float64)
        fisher = g.T @ g
        keep = torch.rand(6) > 0.5
        new = rearrange(keep, fisher)
        assert int(new.sum()) == int(keep.sum())
        assert removal_cost(fisher, new) <= removal_cost(fisher, keep) + 1e-12
    # two blocks that are each harmless to remove alone but costly together (strongly correlated gradients):
    # the diagonal alone removes both; the rearrangement removes one of them and a third, cheaper pair
    fisher = torch.tensor(
        [[1.0, 0.99, 0, 0], [0.99, 1.0, 0, 0], [0, 0, 1.2, 0], [0, 0, 0, 5.0]], dtype=torch.float64
    )
    keep = torch.tensor([False, False, True, True])
    new = rearrange(keep, fisher)
    assert removal_cost(fisher, new) < removal_cost(fisher, keep)
    assert bool(new[3]) and int(new.sum()) == 2


def test_rescaling_lowers_the_reconstruction_error():
    model = tiny_model("BertForSequenceClassification", initializer_range=0.1)
    teacher = copy.deepcopy(model)
    structure = describe(model)
    masks = StructuralMasks.ones(structure)
    masks.set_heads(0, [1, 0, 1, 0])
    masks.set_heads(1, [0, 1, 1, 1])
    masks.set_neurons(0, (torch.arange(40) % 3 != 0).float())
    masks.set_neurons(2, (torch.arange(40) < 12).float())
    batches = [tiny_batch(seed=s, batch=4) for s in range(4)]

    def site_error(student, i):
        """Squared error of attention site i's output projection against the teacher, on real tokens."""
        got, want = [], []
        hs = describe(student).attention[i].o.register_forward_hook(lambda m, a, o: got.append(o))
        ht = describe(teacher).attention[i].o.register_forward_hook(lambda m, a, o: want.append(o))
        aptune.apply_masks(student, masks)
        with torch.no_grad():
            for b in batches:
                student(**b)
                teacher(**b)
        remove_masks(student)
        hs.remove()
        ht.remove()
        keep = torch.cat([b["attention_mask"] for b in batches]).bool()
        return float(((torch.cat(got) - torch.cat(want))[keep] ** 2).sum())

    before = site_error(model, 0)
    fits = rescale_outputs(model, teacher, masks, batches, damping=1e-3)
    after = site_error(model, 0)
    assert len(fits) == 6
    for f in fits:
        assert f.after <= f.before * (1 + 1e-9) + 1e-9
    assert sum(f.after for f in fits) < 0.9 * sum(f.before for f in fits)
    first = next(f for f in fits if f.kind == "attention" and f.site == 0)
    assert first.before == pytest.approx(before, rel=1e-4)  # the fitted objective is the real error
    assert first.after == pytest.approx(after, rel=1e-4)
    assert after < before


def test_schedules():
    assert cubic_density(0, 10, 0.4) == 1.0 and cubic_density(10, 10, 0.4) == pytest.approx(0.4)
    assert [lr_factor(s, 10, 0.2) for s in (0, 1, 2, 9)] == pytest.approx([0.5, 1.0, 1.0, 0.125])
    # a restart at step 4: a fresh warm-up and decay over the 6 steps that follow
    assert lr_factor(3, 10, 0.0, (4,)) == pytest.approx(0.25)
    assert lr_factor(4, 10, 0.0, (4,)) == pytest.approx(1.0)
    assert lr_factor(9, 10, 0.0, (4,)) == pytest.approx(1 / 6)


# -- end to end --------------------------------------------------------------------------------------------

BASE_ARGS = [
    "--batch-size",
    "8",
    "--max-length",
    "16",
    "--no-progress",
    "--no-measure-speed",
    "--ffn-multiple",
    "1",
]


def run_method(folder, method, *extra, monkeypatch=None):
    """Run ``aptune train``; with ``monkeypatch``, also return the final in-memory model it saved."""
    data = write_task(folder, n_train=96, n_eval=32)
    out = folder / method
    saved = []
    if monkeypatch is not None:
        train_module = importlib.import_module("aptune.train")  # (aptune.train is also the function)
        real = train_module.save_pruned

        def capture(model, path, tokenizer=None):
            saved.append(copy.deepcopy(model))
            return real(model, path, tokenizer=tokenizer)

        monkeypatch.setattr(train_module, "save_pruned", capture)
    argv = ["train", "--method", method, "--model", str(folder / "model"), "--train", str(data["train"])]
    argv += ["--validation", str(data["validation"]), "--test", str(data["test"]), "--output", str(out)]
    assert main(argv + BASE_ARGS + list(extra)) == 0
    report = json.loads((out / "report.json").read_text())
    return (report, out, data, saved[0]) if monkeypatch is not None else (report, out, data)


@pytest.mark.parametrize(
    "method, extra",
    [
        ("lora-prune", ["--epochs", "2", "--pretune-epochs", "2", "--calibration-batches", "3"]),
        ("loraprune", ["--epochs", "3", "--iterative-steps", "4"]),
        ("llm-pruner", ["--epochs", "2", "--calibration-batches", "3"]),
        ("llm-pruner", ["--epochs", "1", "--prune-warmup", "0", "--calibration-batches", "2"]),
    ],
)
def test_baseline_meets_the_budget_and_its_saved_model_reloads(tiny_folder, method, extra, monkeypatch):  # noqa: F811
    report, out, data, final = run_method(
        tiny_folder, method, "--density", "0.5", *extra, monkeypatch=monkeypatch
    )
    before, after = report["params_before"], report["params_after"]
    target = int(0.5 * before["prunable"])
    assert after["prunable"] <= target
    # exact up to one block: adding back the cheapest removed block would break the budget
    model = aptune.load_pruned(out / "model")
    shape = StructureShape.of(describe(model))
    costs = [head_cost(shape, i) for i, h in enumerate(shape.heads) if 0 < h < 4]
    costs += [neuron_cost(shape, i) for i, n in enumerate(shape.neurons) if 0 < n < 64]
    assert count_prunable(shape) == after["prunable"]
    assert target - after["prunable"] < max(costs)
    assert report["density"] == pytest.approx(after["prunable"] / before["prunable"])
    assert report["method"] == method and report["method_config"]["target_density"] == 0.5
    assert report["metrics"]["best_step"] >= report["final_structure_step"]
    assert not any("lora" in n for n, _ in model.named_parameters())
    batch = tiny_batch(seed=5, batch=4, vocab=20)
    with torch.no_grad():  # the reloaded model computes what the trained one computed
        torch.testing.assert_close(model(**batch).logits, final.eval()(**batch).logits, rtol=1e-5, atol=1e-6)

    # and gives the reported test accuracy
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(out / "model")
    rows = [json.loads(line) for line in data["test"].read_text().splitlines()]
    enc = tokenizer(
        [r["text"] for r in rows], padding=True, truncation=True, max_length=16, return_tensors="pt"
    )
    with torch.no_grad():
        predictions = model(**enc).logits.argmax(-1)
    acc = float((predictions == torch.tensor([r["label"] for r in rows])).float().mean())
    assert acc == pytest.approx(report["metrics"]["test_at_best"])


def test_lora_prune_time_includes_the_lora_phase_and_rescaling_helps(tiny_folder):  # noqa: F811
    report, _, _ = run_method(
        tiny_folder,
        "lora-prune",
        "--density",
        "0.5",
        "--epochs",
        "1",
        "--pretune-epochs",
        "2",
        "--calibration-batches",
        "2",
    )
    steps_per_epoch = report["steps_per_epoch"]
    assert report["final_structure_step"] == 2 * steps_per_epoch
    assert report["steps"] == 3 * steps_per_epoch  # LoRA, then as long again retraining
    record = report["method_history"][0]
    assert record["reconstruction_error"]["after"] < record["reconstruction_error"]["before"]
    assert record["fisher_cost"]["rearranged"] <= record["fisher_cost"]["search"]
    first_pruned = next(h for h in report["history"] if h["step"] >= report["final_structure_step"])
    assert first_pruned["train_time_s"] > report["history"][0]["train_time_s"]  # the clock kept running


def loraprune_argv(folder, *flags):
    """``aptune train --method loraprune`` on a small task in ``folder``, writing to ``folder/x``."""
    data = write_task(folder, n_train=16, n_eval=8)
    argv = ["train", "--method", "loraprune", "--model", str(folder / "model"), "--train", str(data["train"])]
    return [*argv, "--validation", str(data["validation"]), "--output", str(folder / "x"), *flags]


def test_a_method_that_does_not_support_the_family_fails_before_training(tiny_folder, capsys, monkeypatch):  # noqa: F811
    info = REGISTRY["loraprune"]
    monkeypatch.setitem(REGISTRY, "loraprune", MethodInfo(**{**info.__dict__, "families": ("llama",)}))
    argv = loraprune_argv(tiny_folder)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "does not support 'bert' models" in err and "llama" in err
    assert not (tiny_folder / "x" / "report.json").exists()


def test_unknown_method_and_registration(capsys):
    assert main(["train", "--method", "prune-everything"]) == 2
    assert "unknown method 'prune-everything'" in capsys.readouterr().err
    info = MethodInfo("my-full", "a registered method", REGISTRY["full"].factory, 1e-4, prunes=False)
    register(info)
    try:
        assert TrainConfig(method="my-full").lr == 1e-4
    finally:
        del REGISTRY["my-full"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--iterative-steps", "0"], "iterative_steps must be >= 1"),
        (["--prune-warmup", "1.5"], "prune_warmup must be in [0, 1)"),
        (["--iterative-start", "0.5", "--iterative-end", "0.2"], "iterative_start < iterative_end"),
        (["--calibration-batches", "0"], "calibration_batches must be >= 1"),
        (["--lora-targets", "qq"], "unknown LoRA targets"),
    ],
)
def test_bad_baseline_settings_are_one_line_errors(tiny_folder, capsys, flags, message):  # noqa: F811
    argv = loraprune_argv(tiny_folder, *flags)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_loraprune_window_too_short_for_its_steps_is_refused(tiny_folder, capsys):  # noqa: F811
    argv = loraprune_argv(tiny_folder, "--max-steps", "8")
    assert main(argv + ["--no-progress"]) == 2
    assert "shorter than its 10 pruning steps" in capsys.readouterr().err
    assert not (tiny_folder / "x" / "report.json").exists()
