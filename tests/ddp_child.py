"""Run ``aptune train`` in one process of a multi-process run and record, at the start of every step, a hash
of what must be identical on every process: the model's parameters and shapes and, for APT, its masks and
adapter ranks. Written to ``$HASH_DIR/rank{R}.json``. Used by tests/test_distributed.py under torchrun."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from aptune.cli import main
from aptune.methods.apt import APT
from aptune.methods.base import Method

records: list[str] = []


def fingerprint(method: Method) -> str:
    h = hashlib.sha256()
    for name, p in method.model.named_parameters():
        h.update(name.encode() + str(tuple(p.shape)).encode() + p.detach().cpu().numpy().tobytes())
    controller = getattr(method, "controller", None)
    if controller is not None:
        for t in controller.masks.all_tensors():
            h.update(t.detach().cpu().numpy().tobytes())
        h.update(json.dumps([a.rank for a in controller.adapters]).encode())
    return h.hexdigest()


def recording(original):
    def before_forward(self):
        records.append(fingerprint(self))
        return original(self)

    return before_forward


Method.before_forward = recording(Method.before_forward)
APT.before_forward = recording(APT.before_forward)

code = main(sys.argv[1:])
rank = int(os.environ.get("RANK", "0"))
Path(os.environ["HASH_DIR"], f"rank{rank}.json").write_text(json.dumps(records))
sys.exit(code)
