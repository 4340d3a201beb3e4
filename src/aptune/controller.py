"""APTController: the per-step glue of APT. It holds the state and calls the pieces; it does no math itself.

One training step, as the training loop calls it:

    controller.before_forward()        # turns salience collection on while it is needed
    loss = model(**batch).loss; loss.backward()
    controller.after_backward()        # folds this step's block and rank salience into the moving averages
    optimizer.step(); optimizer.zero_grad()
    if controller.after_step():        # decays masks; at checkpoints compacts and grows ranks
        optimizer = rebuild(controller.trainable_parameters())

``state_dict()`` / ``load_state_dict()`` hold everything needed to continue: step, masks, moving averages,
ranks and the teacher. The model's own weights are saved by the training loop. To resume on a freshly loaded
starting model, ``restore(shape_and_ranks, state)`` first cuts it to the saved shape (``aptune.compact``), then
the loop loads the weights (``aptune train --resume``; :mod:`aptune.checkpoint`).

With self-distillation (``APTConfig.distill``; off by default), the loop gets the loss from
``controller.compute_loss(batch)`` and reports validation metrics with ``observe_validation(metric)``: the
teacher is the student's snapshot at the start of distillation. At a pruning checkpoint it is refreshed
when the reported validation metric beats the teacher's (the official code's rule), or at every checkpoint
when no metric is reported. Because teacher and student share the frozen weights, pruned blocks stay masked
(not removed) while a teacher uses them: they are removed physically at a refresh (the new teacher is the
pruned student) and when distillation ends. Removing them earlier degraded the teacher in our runs.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed
from .adapter import add_adapters, rank_saliences
from .arch import describe, get_spec, is_causal_lm
from .budget import StructureShape, count_prunable
from .compact import compact, cut_to, load_state_strictly, shape_and_ranks
from .config import APTConfig
from .distill import SelfDistiller, target_mask
from .masks import StructuralMasks, apply_masks, remove_masks
from .memory import release_memory
from .salience import BlockScores, SalienceCollector, ema, ema_, outlier_scores, with_outliers
from .schedule import adapter_budget, distill_weight, mask_decay_tensor, pruning_schedule
from .selection import Selection, select_blocks, select_uniform
from .tuner import adapter_params, grow_ranks, importance_of


class APTController:
    """Adaptive pruning and tuning of one model. See the module docstring for the call order."""

    def __init__(
        self,
        model: nn.Module,
        config: APTConfig,
        total_steps: int,
        steps_per_epoch: int,
        remove_during_training: bool = True,
    ):
        self.model = model
        # False on a sharded model (aptune.sharding): pruned blocks stay masked until finish() compacts them
        self.remove_during_training = remove_during_training
        self.config = config.resolve(
            total_steps,
            steps_per_epoch,
            decoder=is_causal_lm(model),
            adapter_targets=get_spec(model).default_adapter_targets(model),
        )
        c = self.config
        for p in model.parameters():
            p.requires_grad_(False)
        self.adapters = add_adapters(model, c.adapter_targets, rank=c.initial_rank)
        # grown adapter rows are drawn from their own generator, seeded here from the global one: the same
        # in every process of a multi-process run, and untouched by dropout's draws
        self.generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,)).item()))
        if c.train_head:
            for module in describe(model).new_heads.values():
                for p in module.parameters():
                    p.requires_grad_(True)
        initial = c.initial_density if c.recipe == "one-shot" else 1.0
        self.schedule = pruning_schedule(
            c.salience_start,
            c.pruning_end,
            c.warmup_end,
            c.num_checkpoints,
            c.target_density,
            c.decay_window,
            initial_density=initial,
        )
        # one-shot to the target leaves nothing to prune during training: only the ranks grow
        self.prunes_in_training = initial > c.target_density
        self.calibrated = c.recipe != "one-shot"
        self.base_params = count_prunable(StructureShape.of(describe(model)))
        self.initial_adapter_params = adapter_params(self.adapters)
        self.step = 0
        self.scores: BlockScores | None = None
        self.rank_scores: list[Tensor | None] = [None] * len(self.adapters)
        # moving averages of the mean inputs of the output projections (the outlier term's x_bar)
        self.head_inputs: list[Tensor | None] = []
        self.neuron_inputs: list[Tensor | None] = []
        self._outliers: BlockScores | None = None  # the outlier term, computed once per decay window
        self._outlier_window: int | None = None
        self.history: list[dict[str, Any]] = []
        self._hook_up(StructuralMasks.for_model(model))
        distill = bool(c.distill)
        self.distiller = (
            SelfDistiller(
                model,
                describe(model).hidden.size,
                self._head_parameters(),
                temperature=c.distill_temperature,
                pred_weight=c.distill_pred_weight,
                layer_weight=c.distill_layer_weight,
                transform_rank=c.transform_rank,
            )
            if distill
            else None
        )
        self.latest_validation: float | None = None
        self.teacher_validation: float | None = None

    def _head_parameters(self) -> dict[str, nn.Parameter]:
        """The trained non-adapter parameters (the task head), whose snapshot the teacher uses."""
        return self._head_parameters_of(self.model)

    @staticmethod
    def _head_parameters_of(model: nn.Module) -> dict[str, nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}

    # -- wiring ------------------------------------------------------------------------------------------
    def _hook_up(self, masks: StructuralMasks) -> None:
        self.masks = masks
        apply_masks(self.model, masks)
        if getattr(self, "collector", None) is not None:
            self.collector.remove()
        structure = describe(self.model)
        self.collector = SalienceCollector(self.model, structure, track_inputs=self.config.use_kurtosis)
        if len(self.head_inputs) != len(structure.attention):
            self.head_inputs = [None] * len(structure.attention)
        if len(self.neuron_inputs) != len(structure.ffn):
            self.neuron_inputs = [None] * len(structure.ffn)
        self._outliers = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        extra = self.distiller.parameters() if self.distiller is not None else []
        return [p for p in self.model.parameters() if p.requires_grad] + extra

    @property
    def distilling(self) -> bool:
        c = self.config
        return self.distiller is not None and c.warmup_end <= self.step < c.distill_end

    def compute_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """The training loss of this step: the task loss, mixed with self-distillation inside its window."""
        if not self.distilling:
            return self.model(**batch).loss
        if not self.distiller.has_teacher:
            self.distiller.snapshot()
            self.teacher_validation = self.latest_validation
        teacher = self.distiller.teacher_outputs(batch)
        out = self.model(**batch, output_hidden_states=True)
        mu = self.distill_weight()
        distill = self.distiller.loss(
            out, teacher, self._alive_layers(), batch.get("attention_mask"), target_mask(batch)
        )
        return mu * distill + (1 - mu) * out.loss

    def distill_weight(self) -> float:
        """mu at the current step: linear from 0 to 1 over the pruning window, then 1 (spec §7.5)."""
        return distill_weight(self.step, self.config.salience_start, self.config.pruning_end)

    def observe_validation(self, metric: float) -> None:
        """Tell the controller the latest validation metric (higher is better).

        At the next pruning checkpoint, a metric better than the teacher's (the one seen when it was taken)
        makes the current student the new teacher.
        """
        self.latest_validation = float(metric)

    def _alive_layers(self) -> list[bool]:
        structure = describe(self.model)
        alive = [True] * structure.num_layers
        for site, mask in zip(structure.attention, self.masks.heads, strict=True):
            alive[site.layer] &= bool((mask > 0).any())
        for site, mask in zip(structure.ffn, self.masks.neurons, strict=True):
            alive[site.layer] &= bool((mask > 0).any())
        return alive

    @property
    def in_window(self) -> bool:
        """Inside the pruning-and-tuning window: rank salience is gathered."""
        return self.config.salience_start <= self.step < self.config.pruning_end

    @property
    def collecting(self) -> bool:
        """Block salience is gathered: inside the window, when blocks are still to be pruned."""
        return self.prunes_in_training and self.in_window

    # -- one-shot pruning before tuning (the decoder recipe) ------------------------------------------------
    def calibrate(self, batches: Iterable[dict[str, Tensor]], same_everywhere: bool = True) -> dict[str, Any]:
        """Score blocks on the first ``one_shot_batches`` of ``batches`` and prune once to ``initial_density``
        (spec §5.7).

        Each batch runs forward *and* backward, in micro-batches of ``one_shot_micro_batch`` rows (the paper's
        scripts score 1-2 examples at a time; it bounds the memory of this full-size pass), with the adapters
        attached but not stepped (the released code runs forward only, so its gradient hooks never fire). The
        per-micro-batch salience is summed (with ``one_shot_salience="taylor"``, heads and neurons are scored
        instead by ``|w x dL/dw|`` over their weights, from the gradients the same passes accumulate), the
        outlier term (``use_kurtosis``) is added, blocks are selected
        under the ``initial_density`` budget and removed physically before the first optimizer step, so
        training runs on the smaller model. Returns a summary, also appended to ``history``.

        In a multi-process run the sums are all-reduced before the selection, so every process removes the same
        blocks. ``same_everywhere``: every process iterates the same ``batches`` (aptune's loop), so the scoring
        passes are shared out (process r takes passes r, r + N, ...); pass False when each process has its own
        batches (a Trainer's sharded dataloader): each then scores all of its own.
        """
        c = self.config
        if c.recipe != "one-shot":
            raise RuntimeError("calibrate() is the one-shot recipe's first step; this run prunes gradually")
        if self.calibrated:
            raise RuntimeError("calibrate() already ran")
        trainable = self.trainable_parameters()
        batches = itertools.islice(batches, c.one_shot_batches)
        processes = distributed.world_size()
        split, me = (processes, distributed.rank()) if same_everywhere else (1, 0)
        passes: Iterable[dict[str, Tensor]] = _micro_batches(batches, c.one_shot_micro_batch)
        # a sharded model's forward is a collective (aptune.sharding): every process must run as many passes
        lockstep = distributed.lockstep()
        if lockstep:
            passes = list(passes)
        # "taylor": the same passes also accumulate the gradient of every projection weight
        from .methods.llm_pruner.importance import WeightGradients  # the criterion LLM-Pruner's baseline uses

        taylor = c.one_shot_salience == "taylor"
        weights = WeightGradients(self.model) if taylor else contextlib.nullcontext()
        with weights:
            total, n, rows, inputs = self._score_passes(passes, split, me, lockstep, trainable)
            if processes > 1:
                counts = torch.tensor([n, rows], dtype=torch.float64)
                distributed.all_reduce_([counts], "sum")
                n, rows = (int(x) for x in counts.tolist())
                if total is None:  # fewer passes than processes: this one scored nothing
                    device = next(self.model.parameters()).device
                    total = BlockScores.zeros(describe(self.model), device=device)
                distributed.all_reduce_(total.tensors(), "sum")
            if n == 0:
                raise ValueError("calibration got no batches")
            if taylor:  # heads and neurons by Taylor, hidden channels by salience
                distributed.all_reduce_(weights.gradients(), "sum")
                heads, neurons = weights.scores()
                total = BlockScores(
                    [h.to(t.device, t.dtype) for h, t in zip(heads, total.heads, strict=True)],
                    [x.to(t.device, t.dtype) for x, t in zip(neurons, total.neurons, strict=True)],
                    total.hidden,
                )
        if inputs is not None:
            if processes > 1:
                distributed.all_reduce_([x for part in inputs for x in part if x is not None], "sum")
            self.head_inputs, self.neuron_inputs = (
                [None if x is None else x / n for x in part] for part in inputs
            )
        self.scores = total
        shape = StructureShape.of(describe(self.model))
        sel = self._select(shape, self.selection_scores(), c.initial_density)
        for i, keep in enumerate(sel.heads):
            self.masks.set_heads(i, keep.to(self.masks.heads[i]))
        for i, keep in enumerate(sel.neurons):
            self.masks.set_neurons(i, keep.to(self.masks.neurons[i]))
        self.masks.set_hidden(sel.hidden.to(self.masks.hidden))
        if self.remove_during_training and self._has_pruned_blocks():
            self.prune_physically()
        if not self.prunes_in_training:
            self.scores = None  # nothing more to select: the moving averages are not kept
        self.calibrated = True
        plan = self.live_shape().plan_dict()  # the kept blocks, whether removed or (sharded) still masked
        summary = {
            "step": 0,
            "scoring_passes": n,
            "rows": rows,
            "density": self.density(),
            **{k: plan[k] for k in ("heads", "kv_heads", "neurons", "hidden")},
        }
        self.history.append(summary)
        release_memory()
        return summary

    def _score_passes(
        self,
        passes: Iterable[dict[str, Tensor]],
        split: int,
        me: int,
        lockstep: bool,
        trainable: list[nn.Parameter],
    ) -> tuple[BlockScores | None, int, int, Any]:
        """Run this process's share of the one-shot scoring passes (pass i when ``i % split == me``), forward and
        backward; return the summed block salience, the passes and rows scored, and (``use_kurtosis``) the
        summed mean inputs of the output projections."""
        total: BlockScores | None = None
        inputs: tuple[list[Tensor | None], list[Tensor | None]] | None = None
        n = rows = 0
        for i, batch in enumerate(passes):
            if i % split != me:
                continue
            n += 1
            rows += len(batch["input_ids"]) if "input_ids" in batch else 1
            self.collector.start()
            loss = self.model(**batch).loss
            loss.backward()
            self.collector.stop()
            if self.config.use_kurtosis:  # summed here, divided by the number of passes by the caller
                heads, neurons = self.collector.mean_inputs()
                if inputs is None:
                    inputs = (heads, neurons)
                else:
                    inputs = tuple(
                        [_add(o, x) for o, x in zip(old, new, strict=True)]
                        for old, new in zip(inputs, (heads, neurons), strict=True)
                    )
            current = self.collector.scores()
            if total is None:
                total = current
            else:
                torch._foreach_add_(total.tensors(), current.tensors())
            for p in trainable:
                p.grad = None
        if lockstep:  # a share that came out short: passes that score nothing keep the collectives paired
            assert isinstance(passes, list)
            for _ in range(-(-len(passes) // split) - n):
                self.model(**passes[0]).loss.mul(0).backward()
                for p in trainable:
                    p.grad = None
        return total, n, rows, inputs

    def _select(self, shape: StructureShape, scores: BlockScores, target: float) -> Selection:
        """Blocks to keep under ``target`` (a density of the original structure), in the configured shape."""
        c = self.config
        budget = int(target * self.base_params)
        if c.shape == "uniform":
            return select_uniform(
                shape,
                [s.clamp(min=0) for s in scores.heads],
                [s.clamp(min=0) for s in scores.neurons],
                budget,
                ffn_multiple=c.ffn_multiple,
                head_multiple=c.head_multiple,
            )
        return select_blocks(
            shape,
            scores.heads,
            scores.neurons,
            scores.hidden,
            target_params=budget,
            ffn_multiple=c.ffn_multiple,
            head_multiple=c.head_multiple,
            prune_hidden=c.prune_hidden,
            hidden_multiple=c.hidden_multiple,
        )

    # -- the step ------------------------------------------------------------------------------------------
    def before_forward(self) -> None:
        if not self.calibrated:
            raise RuntimeError("the one-shot recipe prunes before training: call calibrate(batches) first")
        if self.collecting:
            self.collector.start()
        else:
            self.collector.stop()

    def after_backward(self) -> None:
        if not self.in_window:
            return
        beta = self.config.beta
        self._blend_ranks(beta)  # from the (already averaged) gradients: the same on every process
        if not self.collecting:
            return
        self.collector.all_reduce()  # a multi-process run: every process selects from the same sums
        if self.config.use_kurtosis:
            heads, neurons = self.collector.mean_inputs()
            self.head_inputs = [_blend(o, n, beta) for o, n in zip(self.head_inputs, heads, strict=True)]
            self.neuron_inputs = [
                _blend(o, n, beta) for o, n in zip(self.neuron_inputs, neurons, strict=True)
            ]
        current = self.collector.scores()
        if self.scores is None:
            self.scores = current
        else:
            self.scores.blend_(current, beta)
        self.collector.stop()

    def _blend_ranks(self, beta: float) -> None:
        # kept on the adapters' device: no host sync; fused kernels, not a few launches per adapter
        saliences = rank_saliences(self.adapters)
        history, current_ranks = [], []
        for i, (old, new) in enumerate(zip(self.rank_scores, saliences, strict=True)):
            if old is None or old.shape != new.shape:
                self.rank_scores[i] = new.clone()
            else:
                history.append(old)
                current_ranks.append(new)
        ema_(history, current_ranks, beta)

    def after_step(self) -> bool:
        """Advance one step: move masks inside decay windows; at checkpoints prune physically and grow ranks.

        Returns True when parameters were replaced, so the optimizer must be rebuilt.
        """
        self.step += 1
        changed = False
        # The checkpoint comes first: its masks were made binary on the last step of its window, and the next
        # window may open on this very step (whenever a checkpoint interval equals the decay window).
        if self.schedule.is_checkpoint(self.step):
            changed = self._checkpoint()
        window = self.schedule.decay_window(self.step)
        if window.active and self.prunes_in_training and self.scores is not None:
            self._decay_masks(window.target, last=window.is_last, window=window.checkpoint)
        if self.distiller is not None and self.step == self.config.distill_end:
            changed = self._end_distillation() or changed
        return changed

    def _has_pruned_blocks(self) -> bool:
        return self.masks.is_binary() and not all(bool((m == 1).all()) for m in self.masks.all_tensors())

    @property
    def final_structure_step(self) -> int:
        """The step from which the structure no longer changes: the last checkpoint (with distillation, the
        student is compacted there and the teacher keeps the original modules)."""
        return self.config.pruning_end

    def selection_scores(self, window: int | None = None) -> BlockScores:
        """The scores blocks are selected by, on the host: the salience moving average, plus the outlier
        term when ``use_kurtosis`` is on (recomputed from the weights once per decay window)."""
        scores = self.scores
        if self.config.use_kurtosis:
            if self._outliers is None or window is None or window != self._outlier_window:
                structure = describe(self.model)
                self._outliers = outlier_scores(structure, self.head_inputs, self.neuron_inputs)
                self._outlier_window = window
            masks = BlockScores(self.masks.heads, self.masks.neurons, self.masks.hidden)
            scores = with_outliers(scores, self._outliers, self.config.kurtosis_weight, masks)
        return scores.cpu()  # one transfer: the selection runs on the host

    def _decay_masks(self, target: float, last: bool, window: int | None = None) -> None:
        shape = StructureShape.of(describe(self.model))
        sel = self._select(shape, self.selection_scores(window), target)
        step = self.config.mask_step
        for i, keep in enumerate(sel.heads):
            self.masks.set_heads(i, mask_decay_tensor(self.masks.heads[i], keep, step, last))
        for i, keep in enumerate(sel.neurons):
            self.masks.set_neurons(i, mask_decay_tensor(self.masks.neurons[i], keep, step, last))
        self.masks.set_hidden(mask_decay_tensor(self.masks.hidden, sel.hidden, step, last))

    def _checkpoint(self) -> bool:
        changed = False
        if self.distiller is None or not self.distiller.has_teacher or self.distiller.separate:
            # (a sharded model, which never distils, keeps its blocks masked to the end)
            if self.remove_during_training and self._has_pruned_blocks():
                self.prune_physically()
                changed = True
        elif self._teacher_improved():
            # The teacher shares the backbone, so removing blocks would remove them from the teacher too: while
            # a teacher is in use, blocks stay masked and are removed only when the student becomes the new
            # teacher (here), at the last checkpoint (the student then gets its own compacted copy), or when
            # distillation ends.
            if self._has_pruned_blocks():
                self.prune_physically()
                changed = True
            self.distiller.snapshot()
            self.teacher_validation = self.latest_validation
        budget = adapter_budget(
            self.step,
            self.config.salience_start,
            self.config.pruning_end,
            self.initial_adapter_params,
            self.config.tuning_expansion,
        )
        importance = [importance_of(s) for s in self.rank_scores]
        grown = grow_ranks(self.adapters, importance, budget, self.config.max_rank, self.generator)
        for i, rank in grown.items():
            scores = self.rank_scores[i]
            if scores is not None:
                self.rank_scores[i] = torch.cat([scores, scores.new_zeros(rank - len(scores))])
        release_memory()  # what the last window's fractional masks and any removal freed goes back to the system
        if (
            self.distiller is not None
            and self.distiller.has_teacher
            and not self.distiller.separate
            and self.step == self.schedule.checkpoints[-1]
            and self.step < self.config.distill_end
            and self._has_pruned_blocks()
        ):
            self._separate_student()
            changed = True
        self.history.append(
            {
                "step": self.step,
                "density": self.density(),
                "adapter_params": adapter_params(self.adapters),
                "ranks": [a.rank for a in self.adapters],
            }
        )
        return changed or bool(grown)

    def _separate_student(self) -> None:
        """After the last checkpoint: the teacher gets its own copy of the modules, the student is compacted.

        The structure is final, so the teacher no longer has to share the student's masked, full-width modules.
        It keeps a copy of them that shares every frozen tensor, and the student (the same model object as
        before) is compacted, so it computes only its kept rows and columns (the paper's index-selected
        compute, spec §5.4) instead of running full width to the end of distillation. Extra memory: the kept
        slices of the frozen tensors the student prunes.
        """
        student = self.model
        self.collector.remove()
        remove_masks(student)
        self.distiller.separate_teacher(_copy_sharing_frozen(student))
        apply_masks(student, self.masks)
        self.prune_physically()

    def _end_distillation(self) -> bool:
        """Distillation is over: drop the teacher and remove whatever it still kept masked."""
        changed = False
        if self.distiller.separate:
            self.distiller.release_teacher()
        elif self._has_pruned_blocks():
            self.prune_physically()
            changed = True
        release_memory()
        return changed

    def _teacher_improved(self) -> bool:
        if self.latest_validation is None or self.teacher_validation is None:
            return self.latest_validation is not None or self.teacher_validation is None
        return self.latest_validation > self.teacher_validation

    def prune_physically(self) -> None:
        """Remove the blocks whose (binary) masks are 0 now, and slice every piece of state that follows them."""
        masks = self.masks
        structure = describe(self.model)
        keep_h = [m == 1 for m in masks.heads]
        keep_f = [m == 1 for m in masks.neurons]
        keep_d = masks.hidden == 1
        compact(self.model, masks)
        if self.distiller is not None:
            self.distiller.rebind_head(self._head_parameters())  # compaction replaced the head's tensors
            if not bool(keep_d.all()):
                self.distiller.on_hidden_pruned(torch.nonzero(keep_d).flatten(), len(keep_d))
        if self.scores is not None:
            self.scores = self.scores.keep(keep_h, keep_f, keep_d)
        # the outlier term's mean inputs follow the input channels of the output projections
        self.head_inputs = [
            None if x is None or not bool(k.any()) else x[_unit_channels(k, site.unit_width).to(x.device)]
            for x, k, site in zip(self.head_inputs, keep_h, structure.attention, strict=True)
        ]
        self.neuron_inputs = [
            None if x is None or not bool(k.any()) else x[k.to(x.device)]
            for x, k in zip(self.neuron_inputs, keep_f, strict=True)
        ]
        # adapters whose layer disappeared are no longer in the model
        alive = {id(m) for m in self.model.modules()}
        kept = [i for i, a in enumerate(self.adapters) if id(a) in alive]
        self.adapters = [self.adapters[i] for i in kept]
        self.rank_scores = [self.rank_scores[i] for i in kept]
        self._hook_up(StructuralMasks.for_model(self.model))
        release_memory()

    # -- reporting and state -----------------------------------------------------------------------------
    def live_shape(self) -> StructureShape:
        """The structure's shape, counting masked-out blocks as removed."""
        shape = StructureShape.of(describe(self.model))
        heads = [int((m > 0).sum()) for m in self.masks.heads]
        neurons = [int((m > 0).sum()) for m in self.masks.neurons]
        hidden = int((self.masks.hidden > 0).sum())
        return StructureShape(
            hidden,
            tuple(a.with_units(h) for a, h in zip(shape.attention, heads, strict=True)),
            tuple(replace(f, neurons=n) for f, n in zip(shape.ffn, neurons, strict=True)),
        )

    def density(self) -> float:
        """Density of the live structure, counting masked-out blocks as removed."""
        return count_prunable(self.live_shape()) / self.base_params

    def finish(self) -> nn.Module:
        """Remove hooks; compact whatever binary masks are left; return the model (adapters still attached)."""
        self.collector.remove()
        if self._has_pruned_blocks():
            compact(self.model, self.masks)
        remove_masks(self.model)
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "calibrated": self.calibrated,  # a resumed one-shot run must not prune again
            "config": self.config.to_dict(),
            "base_params": self.base_params,
            "initial_adapter_params": self.initial_adapter_params,
            "masks": self.masks.state_dict(),
            "scores": None if self.scores is None else self.scores.state_dict(),
            "rank_scores": [None if s is None else s.clone() for s in self.rank_scores],
            "head_inputs": [None if x is None else x.clone() for x in self.head_inputs],
            "neuron_inputs": [None if x is None else x.clone() for x in self.neuron_inputs],
            "ranks": [a.rank for a in self.adapters],
            "history": list(self.history),
            "generator": self.generator.get_state(),
            "outliers": None if self._outliers is None else self._outliers.state_dict(),
            "outlier_window": self._outlier_window,
            "distiller": self._distiller_state(),
        }

    def _distiller_state(self) -> dict[str, Any] | None:
        d = self.distiller
        if d is None:
            return None
        return {
            "transform": {k: v.detach().clone() for k, v in d.transform.state_dict().items()},
            "teacher_factors": [
                None if a.teacher_A is None else (a.teacher_A.clone(), a.teacher_B.clone())
                for a in self.adapters
            ],
            "teacher_head": None
            if d.teacher_head is None
            else {k: v.clone() for k, v in d.teacher_head.items()},
            "latest_validation": self.latest_validation,
            "teacher_validation": self.teacher_validation,
            "layer_sampler": d.generator.get_state(),  # which teacher layers the next steps compare
            "separate_teacher": None
            if d.teacher_model is None
            else {"structure": shape_and_ranks(d.teacher_model), "weights": d.teacher_model.state_dict()},
        }

    def restore(self, structure: dict[str, Any], state: dict[str, Any]) -> None:
        """Resume from a checkpoint: cut the model to the saved shape and ranks (a separated teacher to its own)
        and take the saved state. The model's weights are loaded afterwards by the caller."""
        self.collector.remove()
        remove_masks(self.model)
        saved = state.get("distiller") or {}
        teacher = saved.get("separate_teacher")
        if self.distiller is not None and teacher is not None:
            model = _copy_sharing_frozen(self.model)
            cut_to(model, teacher["structure"])
            load_state_strictly(model, teacher["weights"], "the checkpoint's teacher")
            for p in model.parameters():
                p.requires_grad_(False)
            self.distiller.teacher_model = model.eval()
        hidden = describe(self.model).hidden.size
        cut_to(self.model, structure)
        alive = {id(m) for m in self.model.modules()}
        self.adapters = [a for a in self.adapters if id(a) in alive]
        self.rank_scores = [None] * len(self.adapters)
        if self.distiller is not None:
            self.distiller.rebind_head(self._head_parameters())
            kept = describe(self.model).hidden.size
            if kept != hidden:
                self.distiller.on_hidden_pruned(torch.arange(kept), hidden)
        self.load_state_dict(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the controller's state onto a model of the same structure (weights are loaded separately)."""
        ranks = state["ranks"]
        if len(ranks) != len(self.adapters):
            raise ValueError(f"state has {len(ranks)} adapters, the model has {len(self.adapters)}")
        for adapter, rank in zip(self.adapters, ranks, strict=True):
            if rank > adapter.rank:
                adapter.grow(rank)
        self.step = state["step"]
        self.calibrated = state.get("calibrated", True)
        self.base_params = state["base_params"]
        self.initial_adapter_params = state["initial_adapter_params"]
        device = next(self.model.parameters()).device
        scores = state["scores"]
        self.scores = None if scores is None else BlockScores.from_state_dict(scores).to(device)
        self.rank_scores = [None if s is None else s.clone() for s in state["rank_scores"]]
        self.history[:] = state["history"]  # the method's history is this same list
        if state.get("generator") is not None:
            self.generator.set_state(state["generator"])
        self._hook_up(StructuralMasks.from_state_dict(state["masks"]))
        if state.get("outliers") is not None:
            self._outliers = BlockScores.from_state_dict(state["outliers"]).to(device)
            self._outlier_window = state["outlier_window"]
        for name in ("head_inputs", "neuron_inputs"):
            saved_inputs = state.get(name)
            if saved_inputs is not None:
                setattr(self, name, [None if x is None else x.clone() for x in saved_inputs])
        d, saved = self.distiller, state.get("distiller")
        if d is not None and saved is not None:
            transform = saved["transform"]
            rank = transform["lora_A"].shape[0]
            if rank > d.transform.rank:
                d.transform.grow(rank)
            d.transform.load_state_dict(transform)
            for adapter, factors in zip(self.adapters, saved["teacher_factors"], strict=True):
                if factors is not None:
                    adapter.teacher_A, adapter.teacher_B = (t.clone() for t in factors)
            d.teacher_head = None if saved["teacher_head"] is None else dict(saved["teacher_head"])
            self.latest_validation = saved["latest_validation"]
            self.teacher_validation = saved["teacher_validation"]
            if saved.get("layer_sampler") is not None:
                d.generator.set_state(saved["layer_sampler"])


def _copy_sharing_frozen(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose frozen parameters and buffers are the original tensors (not copied)."""
    frozen = [t for t in [*model.parameters(), *model.buffers()] if not t.requires_grad]
    return copy.deepcopy(model, memo={id(t): t for t in frozen})


def _micro_batches(batches: Iterable[dict[str, Tensor]], rows: int) -> Iterable[dict[str, Tensor]]:
    """Each batch cut into consecutive slices of at most ``rows`` rows."""
    for batch in batches:
        n = len(next(iter(batch.values())))
        for start in range(0, n, rows):
            yield {k: v[start : start + rows] for k, v in batch.items()}


def _add(previous: Tensor | None, current: Tensor | None) -> Tensor | None:
    """The sum of two optional per-site vectors."""
    if current is None:
        return previous
    if previous is None:
        return current
    return previous + current


def _blend(previous: Tensor | None, current: Tensor | None, beta: float) -> Tensor | None:
    """The moving average of an optional per-site vector (a site with no input this step keeps its value)."""
    if current is None:
        return previous
    if previous is None or previous.shape != current.shape:
        return current.clone()
    return ema(previous, current, beta)


def _unit_channels(keep: Tensor, width: int) -> Tensor:
    """Input channels of an attention output projection that belong to the kept head units."""
    units = torch.nonzero(keep).flatten()
    return (units[:, None] * width + torch.arange(width)).flatten()
