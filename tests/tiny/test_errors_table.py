"""The table of bad input in docs/errors.md: every row gets exactly its message and exit code, and changes nothing."""

from __future__ import annotations

import collections
import re
import shlex
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ebft.checkpoint import work_dir
from ebft.cli import main

DOC = Path(__file__).resolve().parents[2] / "docs" / "errors.md"
PRUNE = "prune {model} --calib text:{text} --nsamples 4 --seqlen 32 --epochs 1 --device cpu --threads 1 --out {out}"


def _table() -> list:
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if not line.startswith("| ") or line.startswith(("| case ", "| --- ")):
            continue
        cells = [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        case, setup, command, code, message = cells
        rows.append(pytest.param(setup, command.strip("`"), int(code), message.strip("`"), id=case))
    return rows


ROWS = _table()


def test_errors_table_is_well_formed() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert f"`{{prune}}` stands for `{PRUNE}`" in text
    ids = [row.id for row in ROWS]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)


def _snapshot(root: Path) -> list[tuple]:
    return sorted((str(p.relative_to(root)), p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
                  for p in root.rglob("*"))


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "out"
    assert main(shlex.split(PRUNE.format(model=tiny_model_dir, text=text_file, out=out)) + ["--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def unfinished_run(tiny_model_dir: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory,
                   interrupt_after) -> Path:
    out = tmp_path_factory.mktemp("unfinished") / "out"
    with interrupt_after(0):
        assert main(shlex.split(PRUNE.format(model=tiny_model_dir, text=text_file, out=out)) + ["--quiet"]) == 130
    return work_dir(out)


@pytest.fixture(scope="module")
def repair_models(tiny_model_dir: Path, text_file: Path, tokenizer, tmp_path_factory: pytest.TempPathFactory,
                  tiny_factory) -> dict[str, str]:
    """Models that are not the tiny model pruned: another width, structurally shrunk, another tokenizer."""
    import copy

    from ebft.export import write_model
    from ebft.models import load_model

    root = tmp_path_factory.mktemp("repair-models")
    narrow = root / "narrow"
    tiny_factory("llama", hidden_size=24, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=12).save_pretrained(narrow)
    base = PRUNE.format(model=tiny_model_dir, text=text_file, out="{out}") + " --finetune none --quiet"
    assert main(shlex.split(base.format(out=root / "shrunk")) + ["--structured", "0.25"]) == 0
    assert main(shlex.split(base.format(out=root / "pruned"))) == 0
    loaded = load_model(str(root / "pruned" / "model"))
    other = copy.deepcopy(tokenizer)
    other.add_special_tokens({"additional_special_tokens": ["<sep>"]})
    write_model(root / "retok", loaded.model, other)
    return {"narrow": str(narrow), "shrunk": str(root / "shrunk" / "model"), "retok": str(root / "retok")}


@pytest.fixture
def held_locks() -> Iterator[list]:
    handles: list = []
    yield handles
    for handle in handles:
        handle.close()


@pytest.mark.parametrize("setup,command,code,message", ROWS)
def test_errors_table(setup: str, command: str, code: int, message: str, tiny_model_dir: Path, text_file: Path,
                      short_text_file: Path, tmp_path: Path, request: pytest.FixtureRequest,
                      monkeypatch: pytest.MonkeyPatch, held_locks: list, capsys: pytest.CaptureFixture[str],
                      one_line_error) -> None:
    """Every row of docs/errors.md: the command gets exactly that message and exit code, and changes nothing."""
    out = tmp_path / "out"
    values = {"prune": PRUNE, "model": str(tiny_model_dir), "text": str(text_file), "short": str(short_text_file),
              "out": str(out), "work": str(work_dir(out)), "tmp": str(tmp_path)}
    if setup == "repair":
        values.update(request.getfixturevalue("repair_models"))

    def fill(text: str) -> str:
        for key, value in values.items():
            text = text.replace("{" + key + "}", value)
        return text

    setups: dict[str, Callable[[], None]] = {
        "": lambda: None,
        "repair": lambda: None,  # the models of the repair_models fixture
        "files": lambda: (out.mkdir(), (out / "keep.txt").write_text("precious")),
        "out-file": lambda: out.write_text("precious"),
        "tmp-file": lambda: (tmp_path / "file").write_text("precious"),
        "finished": lambda: shutil.copytree(request.getfixturevalue("finished_run"), out),
        "unfinished": lambda: shutil.copytree(request.getfixturevalue("unfinished_run"), work_dir(out)),
        "locked": lambda: (setups["unfinished"](), held_locks.append(_hold_lock(work_dir(out) / "lock"))),
        "disk-full": lambda: monkeypatch.setattr(shutil, "disk_usage", lambda path: _Usage(10**12, 10**12, 0)),
        # started by torchrun as process 1 of 2; every row with it fails before joining the job
        "torchrun": lambda: [monkeypatch.setenv(k, v) for k, v in
                             {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "99"}.items()],
    }
    setups[setup]()
    before = _snapshot(tmp_path)
    capsys.readouterr()
    assert main(shlex.split(fill(fill(command)))) == code
    captured = capsys.readouterr()
    assert captured.out == ""
    line = one_line_error(captured.err)
    pattern = ".*".join(re.escape(fill(part)) for part in message.split("…"))
    assert re.fullmatch("error: " + pattern, line), f"\n{line}\n{message}"
    assert _snapshot(tmp_path) == before  # a refused command changes nothing


_Usage = collections.namedtuple("_Usage", "total used free")


def _hold_lock(path: Path):
    import fcntl

    handle = open(path, "a+")  # noqa: SIM115 - closed by the held_locks fixture
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handle
