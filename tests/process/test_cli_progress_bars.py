"""--quiet in a fresh interpreter: every tqdm bar is off, including third-party ones."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("quiet", [True, False])
def test_quiet_silences_third_party_progress_bars(quiet: bool) -> None:
    """--quiet turns off every tqdm bar, including ones that ignore transformers' switch (GGUF conversion)."""
    script = (
        "import sys\n"
        "from ebft import cli\n"
        "cli.build_parser = lambda: (_ for _ in ()).throw(SystemExit(0))  # stop right after the early setup\n"
        "try:\n    cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "from tqdm.auto import tqdm\n"
        "for _ in tqdm(range(3), desc='Converting'):\n    pass\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    args = ["eval", "model", *(["--quiet"] if quiet else [])]
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=120)
    assert ("Converting" in done.stderr) is not quiet, done.stderr
