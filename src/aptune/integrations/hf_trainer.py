"""APT inside the Hugging Face ``Trainer``: :class:`APTCallback` drives an :class:`~aptune.APTController`.

Usage (the controller must exist before ``trainer.train()`` builds the optimizer, because it freezes the
backbone and attaches the adapters the optimizer has to hold; building it before the ``Trainer`` is simplest)::

    controller = APTController(model, APTConfig(target_density=0.5), total_steps=..., steps_per_epoch=...)
    trainer = Trainer(model=model, args=args, train_dataset=train)
    APTCallback.attach(trainer, controller)  # or: Trainer(..., callbacks=[cb]); cb.bind(trainer)
    trainer.train()
    model = controller.finish()

:func:`training_steps` gives ``total_steps`` and ``steps_per_epoch`` (in optimizer steps, gradient accumulation
included) as the Trainer counts them, so the controller can also be built after the ``Trainer``::

    trainer = Trainer(model=model, args=args, train_dataset=train)
    total, per_epoch = training_steps(trainer)
    controller = APTController(model, config, total_steps=total, steps_per_epoch=per_epoch)
    APTCallback.attach(trainer, controller)

How the controller's calls map onto one optimizer step of ``Trainer._inner_training_loop`` (transformers 5):

* ``on_step_begin`` fires before the first micro-batch of an accumulation group: ``before_forward()``. The
  collection it turns on stays on over all micro-batches, so salience sums over them.
* after the last micro-batch's backward, the Trainer clips gradients and then fires ``on_pre_optimizer_step``.
  ``after_backward()`` runs exactly once per optimizer step: just before clipping (the callback wraps the
  trainer's ``_clip_grad_norm`` while training, so rank salience sees the unclipped gradient, as in a plain loop),
  or in ``on_pre_optimizer_step`` when no clipping happens (``max_grad_norm=0``).
* ``on_step_end`` fires after ``optimizer.step()``, ``lr_scheduler.step()`` and ``zero_grad()``:
  ``after_step()``. When it reports replaced parameters, the optimizer is rebuilt: same class, same param-group
  hyperparameters (each parameter keeps its group by name, so weight-decay groups survive), fresh state (as
  the controller's reference loop), the current learning rate of each group carried over. The new optimizer goes
  inside the Trainer's accelerate ``AcceleratedOptimizer`` (or replaces ``trainer.optimizer`` when there is none),
  and any scheduler bound to the old optimizer object is re-pointed, so the schedule continues unchanged.

Causal language models and TRL's ``SFTTrainer`` (``pip install aptune[trl]``) work the same way: the callback
only sees the Trainer's events, so the Trainer's own loss (TRL's chunked LM head included), data collator and
chat templates are used as they are. Only the adapters train: a causal LM's ``lm_head`` and (tied) embeddings
stay frozen. Build the controller after the ``SFTTrainer``, which may load the model from a name, resize its
embeddings for new tokens or patch its forward; do not pass it a ``peft_config`` (APT attaches its own adapters)::

    trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=chats, processing_class=tokenizer)
    total, per_epoch = training_steps(trainer)
    controller = APTController(trainer.model, config, total_steps=total, steps_per_epoch=per_epoch)
    APTCallback.attach(trainer, controller)
    trainer.train()
    model = controller.finish(); aptune.merge_adapters(model); aptune.save_pruned(model, path, tokenizer)

Activation (gradient) checkpointing, which ``SFTConfig`` turns on by default, is supported in its non-reentrant
form (transformers' default, and the only one TRL's selective checkpointing uses): the salience hooks skip a
block that is recomputed inside the backward pass, so each block is counted once. Reentrant
checkpointing (``use_reentrant=True``) is refused: its forward runs without gradients and the recomputation is
where the activations would have to be read. A controller whose recipe prunes once before training (it is
not ``calibrated`` yet) is calibrated at train begin on the Trainer's first training batches.

Multi-process (DDP) Trainer runs (``accelerate launch`` / ``torchrun``) work: DDP's own gradient reduction is
switched off, because its reducer is built over parameters APT later replaces; the callback averages the current
trainable gradients over processes once per optimizer step, before the controller reads them, and the
controller all-reduces its salience sums before any selection, so every process prunes the same blocks and grows
the same adapters (new adapter rows are broadcast from process 0). A one-shot calibration scores each process's
own first batches and sums over processes. Non-reentrant activation checkpointing works there too.

Unsupported (refused with :class:`UnsupportedTrainerSetup` at bind and train-begin time): DeepSpeed, FSDP,
fp16 loss scaling, DataParallel (one process over several GPUs), reentrant activation checkpointing,
``load_best_model_at_end``, ``auto_find_batch_size``, layer-wise optimizers. Checkpoints the Trainer writes hold
the model as it is (partly pruned, with adapters) but not the controller's state: resuming needs
``controller.load_state_dict`` on a model of the same structure.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from accelerate.optimizer import AcceleratedOptimizer
from transformers import Trainer, TrainerCallback

from .. import distributed
from ..arch import describe
from ..controller import APTController


class UnsupportedTrainerSetup(ValueError):
    """The Trainer is configured in a way APTCallback cannot drive correctly."""


def training_steps(trainer: Trainer) -> tuple[int, int]:
    """``(total optimizer steps, optimizer steps per epoch)`` of ``trainer.train()``, as the Trainer counts them."""
    values = trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())
    num_update_steps_per_epoch, max_steps = values[1], values[6]
    return int(max_steps), int(num_update_steps_per_epoch)


def _flag(obj: Any, name: str, deprecated: str) -> bool:
    """``obj.name``, or ``obj.deprecated`` where only the old name exists (reading it warns in transformers 5)."""
    return bool(getattr(obj, name) if hasattr(obj, name) else getattr(obj, deprecated, False))


def _setup_problems(trainer: Trainer) -> list[str]:
    args = trainer.args
    accelerator = getattr(trainer, "accelerator", None)
    problems = []
    if getattr(args, "deepspeed", None) or getattr(trainer, "is_deepspeed_enabled", False):
        problems.append(
            "DeepSpeed (args.deepspeed): it owns and partitions the optimizer and flattens parameters, so pruned "
            "and grown parameters cannot be swapped in"
        )
    if (
        getattr(args, "fsdp", None)
        or getattr(trainer, "is_fsdp_enabled", False)
        or getattr(trainer, "is_fsdp_xla_enabled", False)
    ):
        problems.append(
            "FSDP (args.fsdp): sharded, flattened parameters cannot be sliced into smaller blocks"
        )
    if getattr(args, "fp16", False) or getattr(accelerator, "scaler", None) is not None:
        problems.append(
            "fp16 loss scaling (args.fp16): the gradient scaler multiplies the gradients salience is computed "
            "from by a changing factor, and steps it skips for overflow would feed inf into the salience "
            "averages; train in bf16 (args.bf16) or fp32"
        )
    if int(getattr(args, "n_gpu", 0) or 0) > 1:
        problems.append(
            f"DataParallel over {args.n_gpu} GPUs: salience hooks would run on per-step replicas; "
            "restrict the run to one device (CUDA_VISIBLE_DEVICES)"
        )
    if _reentrant_checkpointing(args, getattr(trainer, "model", None)):
        problems.append(
            "reentrant activation (gradient) checkpointing (use_reentrant=True, or a checkpoint function it "
            "cannot recognise): its forward runs without gradients, so salience could only be read in the "
            "recomputation; use the non-reentrant form: activation_checkpointing_kwargs={'use_reentrant': False} "
            "(the default when no kwargs are given)"
        )
    if getattr(args, "load_best_model_at_end", False):
        problems.append(
            "args.load_best_model_at_end: a checkpoint saved before a pruning step no longer fits the pruned model"
        )
    if getattr(args, "auto_find_batch_size", False):
        problems.append(
            "args.auto_find_batch_size: a retried training loop would restart the APT schedule on an already "
            "pruned model"
        )
    return problems


def _args_reentrant(args: Any) -> bool:
    """Whether the Trainer's arguments turn on reentrant activation checkpointing."""
    if not _flag(args, "activation_checkpointing", "gradient_checkpointing"):
        return False
    kwargs = getattr(args, "activation_checkpointing_kwargs", None)
    if kwargs is None:
        kwargs = getattr(args, "gradient_checkpointing_kwargs", None)
    kwargs = dict(kwargs) if isinstance(kwargs, dict) else {}
    if kwargs.pop("selective", False):  # TRL's selective checkpointing forces the non-reentrant form
        return False
    for key in ("every_n_layers", "offload"):  # consumed by transformers, not passed to torch
        kwargs.pop(key, None)
    if not kwargs:  # transformers then passes use_reentrant=False
        return False
    reentrant = kwargs.get("use_reentrant")
    return True if reentrant is None else bool(reentrant)  # torch's default is reentrant


def _checkpointing_functions(model: Any) -> list[Any]:
    """The checkpoint functions of the modules of ``model`` that checkpoint their forward now."""
    if not isinstance(model, torch.nn.Module):
        return []
    return [
        getattr(m, "_gradient_checkpointing_func", None)
        for m in model.modules()
        if getattr(m, "gradient_checkpointing", False) is True
    ]


def _model_reentrant(model: Any) -> bool:
    """Whether a module of ``model`` checkpoints reentrantly (or with a function that cannot be recognised)."""
    for func in _checkpointing_functions(model):
        if isinstance(func, functools.partial):
            reentrant = func.keywords.get("use_reentrant")
            if reentrant is None or bool(reentrant):
                return True
        elif func is not None:  # torch's checkpoint without arguments, or something unknown
            return True
    return False


def _reentrant_checkpointing(args: Any, model: Any) -> bool:
    return _args_reentrant(args) or _model_reentrant(model)


def check_supported(trainer: Trainer) -> None:
    """Raise :class:`UnsupportedTrainerSetup` naming every setting of ``trainer`` APTCallback cannot handle."""
    problems = _setup_problems(trainer)
    if problems:
        raise UnsupportedTrainerSetup("APTCallback does not support " + "; ".join(problems))


def _scheduler_parts(scheduler: Any) -> Iterator[Any]:
    """The scheduler and every scheduler nested in it (accelerate's wrapper, SequentialLR, ChainedScheduler)."""
    stack, seen = [scheduler], set()
    while stack:
        s = stack.pop()
        if s is None or id(s) in seen:
            continue
        seen.add(id(s))
        yield s
        stack.append(getattr(s, "scheduler", None))
        stack.extend(getattr(s, "_schedulers", None) or [])


def _optimizer_like(old: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """A new optimizer of ``type(old)`` over ``groups``, built with ``old``'s defaults where its constructor takes them."""
    cls = type(old)
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = dict(old.defaults)
    else:
        kwargs = {k: v for k, v in old.defaults.items() if k in params and k != "params"}
    return cls(groups, **kwargs)


class APTCallback(TrainerCallback):
    """Runs APT (an :class:`~aptune.APTController`) inside ``transformers.Trainer``; see the module docstring.

    The callback must know its Trainer (to replace the optimizer after structural changes): pass it to the
    constructor, call :meth:`bind`, or use :meth:`attach`. ``after_backward_calls`` and ``rebuilds`` count what
    happened, for monitoring.
    """

    def __init__(self, controller: APTController, trainer: Trainer | None = None):
        self.controller = controller
        self.trainer: Trainer | None = None
        self.rebuilds = 0
        self.after_backward_calls = 0
        self._backward_pending = False
        self._group_of: dict[str, int] = {}
        self._clip_saved: tuple[bool, Any] | None = None
        if trainer is not None:
            self.bind(trainer)

    @classmethod
    def attach(cls, trainer: Trainer, controller: APTController) -> APTCallback:
        """Create the callback, add it to ``trainer`` and bind it: the one-line way to turn APT on."""
        return cls(controller).bind(trainer)

    def bind(self, trainer: Trainer) -> APTCallback:
        """Bind to ``trainer`` (adding the callback to it if needed); refuses unsupported setups. Returns self."""
        check_supported(trainer)
        self._check_model(trainer)
        callbacks = trainer.callback_handler.callbacks
        others = [cb for cb in callbacks if isinstance(cb, APTCallback) and cb is not self]
        if others:
            raise ValueError("the Trainer already has another APTCallback; one controller per training run")
        if not any(cb is self for cb in callbacks):
            trainer.add_callback(self)
        self.trainer = trainer
        return self

    # -- helpers -----------------------------------------------------------------------------------------
    def _check_model(self, trainer: Trainer) -> None:
        model = getattr(trainer, "model", None)
        if model is self.controller.model:
            return
        message = "the Trainer trains a different model object than the one the APTController adapts"
        base = getattr(model, "get_base_model", None)
        if callable(base) and base() is self.controller.model:
            message += (
                f" (a {type(model).__name__} wrapping it: APT attaches its own adapters, so do not pass a "
                "peft_config or a PEFT model to the Trainer)"
            )
        raise ValueError(message)

    def _bound(self) -> Trainer:
        if self.trainer is None:
            raise RuntimeError(
                "APTCallback is not bound to its Trainer: call callback.bind(trainer) (or use "
                "APTCallback.attach(trainer, controller)) before trainer.train()"
            )
        return self.trainer

    def _optimizers(self) -> tuple[AcceleratedOptimizer | None, torch.optim.Optimizer]:
        """(accelerate wrapper or None, the torch optimizer that really steps)."""
        held = self._bound().optimizer
        wrapper = held if isinstance(held, AcceleratedOptimizer) else None
        inner = held.optimizer if wrapper is not None else held
        if not isinstance(inner, torch.optim.Optimizer) or isinstance(inner, AcceleratedOptimizer):
            raise UnsupportedTrainerSetup(
                f"APTCallback cannot rebuild the Trainer's optimizer {type(held).__name__} "
                f"(wrapping {type(inner).__name__}): expected a torch.optim.Optimizer, possibly inside accelerate's "
                "AcceleratedOptimizer"
            )
        if type(inner).__name__ == "LayerWiseDummyOptimizer":
            raise UnsupportedTrainerSetup(
                "APTCallback does not support layer-wise optimizers (args.optim '*_layerwise'): their real "
                "optimizers live in per-parameter hooks and cannot be rebuilt over new parameters"
            )
        return wrapper, inner

    def _remember_groups(self, optimizer: torch.optim.Optimizer) -> None:
        names = {id(p): n for n, p in self.controller.model.named_parameters()}
        self._group_of = {
            names[id(p)]: i
            for i, g in enumerate(optimizer.param_groups)
            for p in g["params"]
            if id(p) in names
        }

    def _group_for(self, name: str, groups: list[dict[str, Any]]) -> int:
        if name in self._group_of:
            return self._group_of[name]
        # a parameter under a name the old optimizer did not hold: the Trainer's own weight-decay rule
        trainer = self._bound()
        decays = name in set(trainer.get_decay_parameter_names(self.controller.model))
        wd = trainer.args.weight_decay if decays else 0.0
        return next((i for i, g in enumerate(groups) if g.get("weight_decay") == wd), 0)

    def _after_backward(self) -> None:
        if not self._backward_pending:
            return
        self._backward_pending = False
        if (
            distributed.world_size() > 1
        ):  # DDP's reducer is off (see on_step_begin): average the gradients here
            grads = [p.grad for p in self.controller.trainable_parameters() if p.grad is not None]
            distributed.all_reduce_(grads, "mean")
        self.controller.after_backward()
        self.after_backward_calls += 1

    def _stop_ddp_reducer(self) -> None:
        """Multi-process Trainer runs: turn DDP's own gradient reduction off for good. Its reducer is built over
        the parameters that existed when the Trainer wrapped the model, and APT replaces them (ranks grow, blocks
        are removed), so the callback all-reduces the current trainable gradients itself, once per step, before
        the controller reads them (accelerate's ``no_sync`` restores the flag to this value after each
        micro-batch)."""
        wrapped = getattr(self._bound(), "model_wrapped", None)
        if wrapped is not None and hasattr(wrapped, "require_backward_grad_sync"):
            wrapped.require_backward_grad_sync = False

    def _wrap_clipping(self, trainer: Trainer) -> None:
        """Run after_backward right before the Trainer clips gradients (restored at train end)."""
        original = getattr(trainer, "_clip_grad_norm", None)
        if not callable(original) or getattr(original, "_aptune_callback", None) is self:
            return
        self._clip_saved = ("_clip_grad_norm" in vars(trainer), vars(trainer).get("_clip_grad_norm"))

        def clip_grad_norm(*args: Any, **kwargs: Any) -> Any:
            self._after_backward()
            return original(*args, **kwargs)

        clip_grad_norm._aptune_callback = self  # type: ignore[attr-defined]
        trainer._clip_grad_norm = clip_grad_norm

    def _unwrap_clipping(self, trainer: Trainer) -> None:
        if self._clip_saved is None:
            return
        had, value = self._clip_saved
        if had:
            trainer._clip_grad_norm = value
        else:
            vars(trainer).pop("_clip_grad_norm", None)
        self._clip_saved = None

    def _calibrate(self, trainer: Trainer) -> None:
        """Run the controller's one-shot pruning on the Trainer's first training batches, as it prepares them."""
        c = self.controller
        model = c.model
        was_training = model.training
        model.train()
        batches = (
            trainer._prepare_inputs(b) for b in trainer.get_train_dataloader()
        )  # calibrate() takes its n
        with trainer.compute_loss_context_manager():
            c.calibrate(batches, same_everywhere=False)  # each process scores its own batches; sums reduced
        model.train(was_training)
        model.zero_grad(set_to_none=True)
        self._rebuild_optimizer()

    def _warn_pretrained_trainable(self) -> None:
        """Warn when embeddings or a pretrained head (a causal LM's ``lm_head``) would be trained."""
        structure = describe(self.controller.model)
        pretrained = {**structure.embedding_modules, **structure.head_modules}
        for name in structure.new_heads:
            pretrained.pop(name, None)
        trainable = sorted(
            {
                f"{attr}.{n}"
                for attr, module in pretrained.items()
                for n, p in module.named_parameters()
                if p.requires_grad and "lora_" not in n
            }
        )
        if trainable:
            warnings.warn(
                f"pretrained embedding or head parameters are trainable and will be trained ({trainable[:3]}): "
                "APT trains only adapters (and the task layers a task class adds); they were probably unfrozen "
                "after the APTController was built, e.g. by resizing the embeddings for new tokens: build the "
                "controller after the Trainer, or freeze them",
                stacklevel=3,
            )

    def _rebuild_optimizer(self) -> None:
        trainer = self._bound()
        wrapper, old = self._optimizers()
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": []} for g in old.param_groups]
        for name, p in self.controller.model.named_parameters():
            if p.requires_grad:
                groups[self._group_for(name, groups)]["params"].append(p)
        new = _optimizer_like(old, groups)
        if wrapper is not None:
            wrapper.optimizer = new
        else:
            trainer.optimizer = new
        trainer.callback_handler.optimizer = trainer.optimizer
        for part in _scheduler_parts(trainer.lr_scheduler):
            if getattr(part, "optimizer", None) is old:
                part.optimizer = new
            optimizers = getattr(part, "optimizers", None)
            if isinstance(optimizers, list):
                part.optimizers = [new if o is old else o for o in optimizers]
        self._remember_groups(new)
        self.rebuilds += 1

    # -- Trainer events ----------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._bound()
        check_supported(trainer)
        c = self.controller
        if c.distiller is not None:
            warnings.warn(
                "the Trainer computes its own loss, so APT's self-distillation is not applied under APTCallback; "
                "use aptune.train for it, or pass APTConfig(distill=False) to silence this warning",
                stacklevel=2,
            )
        self._check_model(trainer)
        if state.global_step != c.step:
            raise ValueError(
                f"the Trainer starts at step {state.global_step} but the APT controller is at step {c.step}; "
                "when resuming, restore the controller with load_state_dict first"
            )
        if c.config.pruning_end > state.max_steps:
            raise ValueError(
                f"the APT schedule prunes until step {c.config.pruning_end} but the Trainer runs only "
                f"{state.max_steps} optimizer steps; build the controller with total_steps and steps_per_epoch "
                "from aptune.integrations.training_steps(trainer)"
            )
        wrapper, inner = self._optimizers()
        held = {id(p) for g in inner.param_groups for p in g["params"]}
        missing = [n for n, p in c.model.named_parameters() if p.requires_grad and id(p) not in held]
        if missing:
            raise ValueError(
                f"the Trainer's optimizer does not hold {len(missing)} trainable parameters (e.g. {missing[:3]}): "
                "it was built before the APTController froze the backbone and attached adapters; create the "
                "controller before trainer.train() and before any optimizer passed as Trainer(optimizers=...)"
            )
        for part in _scheduler_parts(trainer.lr_scheduler):
            bound_to = getattr(part, "optimizer", None)
            if isinstance(bound_to, torch.optim.Optimizer) and bound_to not in (wrapper, inner):
                raise UnsupportedTrainerSetup(
                    f"the lr scheduler {type(part).__name__} drives an optimizer that is not the Trainer's, so "
                    "APTCallback could not keep it in step after rebuilding the optimizer"
                )
        self._remember_groups(inner)
        self._backward_pending = False
        self._warn_pretrained_trainable()
        self._wrap_clipping(trainer)
        if getattr(c, "calibrated", True) is False:  # a recipe that prunes once before the first step
            self._calibrate(trainer)

    def on_step_begin(self, args, state, control, **kwargs):
        self._backward_pending = True
        if distributed.world_size() > 1:
            self._stop_ddp_reducer()
        self.controller.before_forward()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._after_backward()

    def on_step_end(self, args, state, control, **kwargs):
        if self.controller.after_step():
            # parameters a structural change created (grown adapter rows) start equal on every process
            distributed.broadcast_(self.controller.trainable_parameters())
            self._rebuild_optimizer()

    def on_train_end(self, args, state, control, **kwargs):
        if self.trainer is not None:
            self._unwrap_clipping(self.trainer)
