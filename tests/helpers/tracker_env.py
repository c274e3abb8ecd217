"""What the W&B tests share: waiting for W&B's files (importable from tests by name)."""

from __future__ import annotations

import sys


def wandb_settled() -> None:
    """Wait until W&B has written every file of the runs of this process, and forget its
    process-wide settings.

    ``run.finish()`` returns before W&B's service process has flushed the run's journal
    (``run-*.wandb``) and media; tearing the service down waits for both. W&B also reads its
    environment (``WANDB_MODE``, ``WANDB_DIR`` ...) once per process: after a teardown the next
    ``wandb.init`` reads this test's environment, not an earlier test's."""
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        wandb.teardown()
