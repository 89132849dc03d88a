"""``python tests/kill_after_block.py K ARGS...``: ``ebft ARGS...``, SIGKILLed right after block K's checkpoint.

The crash the resume tests need, made from outside the library: the process kills itself as soon as
block ``K``'s checkpoint is committed, as a power cut or the OOM killer would. Under torchrun only
rank 0 saves checkpoints, so only rank 0 dies (and torchrun then stops the others).
"""

from __future__ import annotations

import os
import signal
import sys

from ebft.checkpoint import Checkpoint
from ebft.cli import main

KILL_AFTER = int(sys.argv[1])
_save_block = Checkpoint.save_block


def _save_and_die(self: Checkpoint, index: int, *args: object, **kwargs: object) -> None:
    _save_block(self, index, *args, **kwargs)
    if index == KILL_AFTER:
        os.kill(os.getpid(), signal.SIGKILL)


Checkpoint.save_block = _save_and_die  # type: ignore[method-assign]
sys.exit(main(sys.argv[2:]))
