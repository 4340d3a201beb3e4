"""One process of a multi-process ``transformers.Trainer`` run with APTCallback (tests/test_distributed.py runs
it under torchrun, and alone as the single-process reference). Per-device batch = 16 / processes, sequential
sampling, so every optimizer step sees the same 16 rows whatever the number of processes. Writes, per
process, a hash of the trainable parameters, masks and ranks after every step (``steps-rank{R}.json``), and
from process 0 the final model (``final.safetensors``) to the folder given as the first argument."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from test_hf_trainer import CONFIG, TRAIN, make_args, make_model
from transformers import Trainer, TrainerCallback

from aptune.controller import APTController
from aptune.integrations import APTCallback, training_steps

out = Path(sys.argv[1])
checkpointing = "--gradient-checkpointing" in sys.argv
processes = int(os.environ.get("WORLD_SIZE", "1"))
rank = int(os.environ.get("RANK", "0"))


class Fingerprints(TrainerCallback):
    def __init__(self, controller: APTController):
        self.controller, self.steps = controller, []

    def on_step_end(self, args, state, control, **kwargs):
        h = hashlib.sha256()
        for p in self.controller.trainable_parameters():
            h.update(p.detach().cpu().numpy().tobytes())
        for t in self.controller.masks.all_tensors():
            h.update(t.cpu().numpy().tobytes())
        h.update(json.dumps([a.rank for a in self.controller.adapters]).encode())
        self.steps.append(h.hexdigest())


torch.manual_seed(0)
model = make_model()
args = make_args(
    out / "trainer",
    per_device_train_batch_size=16 // processes,
    num_train_epochs=5,  # 100 steps: SMALL_SCHEDULE prunes from step 10 to 90
    train_sampling_strategy="sequential",
    lr_scheduler_type="constant",
    optim="adamw_torch",
    # the Trainer multiplies the loss by the number of processes when the model takes loss kwargs (BERT does)
    # but computes a per-process mean (BERT's classification loss): off, so 1 and 2 processes see one gradient
    average_tokens_across_devices=False,
    gradient_checkpointing=checkpointing,
    gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
)
trainer = Trainer(model=model, args=args, train_dataset=TRAIN)
total, per_epoch = training_steps(trainer)
controller = APTController(model, CONFIG, total_steps=total, steps_per_epoch=per_epoch)
APTCallback.attach(trainer, controller)
recorder = Fingerprints(controller)
trainer.add_callback(recorder)
trainer.train()
(out / f"steps-rank{rank}.json").write_text(json.dumps(recorder.steps))
if rank == 0:
    final = controller.finish()
    save_file({k: v.contiguous() for k, v in final.state_dict().items()}, str(out / "final.safetensors"))
