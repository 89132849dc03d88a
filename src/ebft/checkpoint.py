"""Durable per-block checkpoints, so that a killed ``ebft prune`` continues where it stopped.

A run with ``--out DIR`` works in a stable sibling folder, ``.DIR.partial`` (``work_dir``), that
survives a crash; ``DIR`` itself appears only at the end, complete (``model/`` + ``report.json``)::

    .DIR.partial/
      run.json                  the commit record: format, config, calibration fingerprint,
                                done (finished blocks), blocks (their reports), hidden (file name),
                                resumes (``done`` at each resume)
      blocks/00003.safetensors  block 3's tuned state ("param.<name>") and masks ("mask.<module>")
      hidden-00003.pt           activations leaving block 3 = entering block 4, [nsamples, seqlen, hidden] fp32
      dense-00003.pt            the dense model's own activations there (only with --block-targets dense)
      final/                    model/ + report.json, staged; renamed to DIR as the very last step
      lock                      flock held by the process working in the folder

Every file is written to a temporary name, fsynced and renamed into place. After block ``i`` the
block file and the hidden file are written first and ``run.json`` last: a crash before that rename
leaves the previous commit intact, and files it does not name are ignored (and cleaned up later).

RNG: the walk seeds every block from ``(seed, index)`` (tuners their own generators, anything
else through a forked global generator), so no RNG state has to be carried between blocks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ebft.errors import EbftError, UsageError
from ebft.fsio import atomic_write, check_out_path, fsync_path, fsync_tree, replace_dir, write_json
from ebft.results import BlockReport
from ebft.settings import config_diff
from ebft.walk import BlockWalk, Callback

logger = logging.getLogger(__name__)

FORMAT = 2  # 2: method options under config.finetune.options / config.prune.options

# ----------------------------------------------------------------------------- pure helpers


def work_dir(out: Path) -> Path:
    """The pid-independent work folder of ``--out out``: a hidden sibling, on the same file system."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def fingerprint(calib_ids: torch.Tensor) -> str:
    """sha256 of the calibration windows: a resumed run must see exactly the same data."""
    data = calib_ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
    return hashlib.sha256(data + str(tuple(calib_ids.shape)).encode()).hexdigest()


def read_report(folder: Path) -> dict[str, Any] | None:
    """``folder/report.json`` if it is a readable run report (has a config), else ``None``."""
    try:
        report = json.loads((Path(folder) / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and isinstance(report.get("config"), dict) else None


def plan_run(out: Path, config: dict[str, Any], overwrite: bool, resume: bool) -> str:
    """Decide what ``--out`` allows, before any heavy work; raise ``UsageError`` with what to pass.

    Returns ``"fresh"`` (start over), ``"resume"`` (continue the unfinished run), ``"publish"``
    (the unfinished run only has to be renamed into place) or ``"finished"`` (``out`` already
    holds this very run and ``resume`` was asked for: nothing to do).
    """
    out = Path(out)
    if overwrite and resume:
        raise UsageError("--resume and --overwrite exclude each other; pass only one of them")
    check_out_path(out)
    if overwrite:
        return "fresh"
    work = work_dir(out)
    if work.exists():
        if not resume:
            raise UsageError(f"--out {out} has an unfinished run (in {work}); "
                             "pass --resume to continue it or --overwrite to start over")
        state = _read_state(work)
        if state is None:
            return "fresh"  # killed before its first commit: nothing to continue
        diff = config_diff(state["config"], config)
        if diff is not None:
            raise _other_settings(work, diff)
        return "publish" if read_report(work / "final") is not None else "resume"
    if out.is_dir() and any(out.iterdir()):
        report = read_report(out)
        if report is None:
            raise UsageError(f"--out {out} already exists and is not empty; choose another folder or pass --overwrite")
        diff = config_diff(report["config"], config)
        if diff is not None:
            raise UsageError(f"--out {out} already holds a different run ({diff}); "
                             "choose another folder or pass --overwrite to replace it")
        if not resume:
            raise UsageError(f"--out {out} already holds this run, finished; "
                             "pass --resume to keep it or --overwrite to redo it")
        return "finished"
    return "fresh"


def check_resumable(out: Path, calib_fingerprint: str) -> None:
    """Before any weight loads: the unfinished run of ``out`` saw these very calibration windows."""
    work = work_dir(out)
    state = _read_state(work)
    if state is not None:
        _check_fingerprint(work, state, calib_fingerprint)


def _check_fingerprint(work: Path, state: dict[str, Any], calib_fingerprint: str) -> None:
    if state["fingerprint"] != calib_fingerprint:
        raise EbftError(f"--resume: the calibration windows differ from those of the unfinished run in "
                        f"{work} (did the data change?); pass --overwrite to start over")


def _other_settings(work: Path, diff: str) -> UsageError:
    return UsageError(f"--resume: the unfinished run in {work} was started with other settings ({diff}); "
                      "repeat its flags or pass --overwrite to start over")


# ----------------------------------------------------------------------------- the run state


def _read_state(work: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((work / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        return None
    if state.get("format") != FORMAT:
        raise UsageError(f"--resume: the unfinished run in {work} was written by another version of ebft "
                         f"(checkpoint format {state.get('format')!r}, this one writes {FORMAT}); pass --overwrite "
                         "to start over")
    return state


def _lock(work: Path) -> Any:
    """An exclusive advisory lock on ``work/lock``; the kernel drops it when the process dies."""
    handle = open(work / "lock", "a+")  # noqa: SIM115 - held for the life of the checkpoint
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise EbftError(f"another ebft process is working in {work}; wait for it or choose another --out") from None
    return handle


# ----------------------------------------------------------------------------- the checkpoint


class Checkpoint:
    """The work folder of one run: per-block commits, and the final rename into ``--out``."""

    def __init__(self, out: Path, state: dict[str, Any], lock: Any) -> None:
        self.out = Path(out)
        self.folder = work_dir(self.out)
        self.state = state
        self._lock = lock
        self._pending: list[dict[str, Any]] = []  # reports of saved blocks not yet committed (see save_block)

    @classmethod
    def open(cls, out: Path, config: dict[str, Any], calib_fingerprint: str, resume: bool) -> Checkpoint:
        """Continue the run in ``work_dir(out)`` when ``resume`` (after checking it), else start a fresh one."""
        work = work_dir(out)
        work.parent.mkdir(parents=True, exist_ok=True)
        work.mkdir(exist_ok=True)
        lock = _lock(work)
        try:
            state = _read_state(work) if resume else None
            if state is not None:
                diff = config_diff(state["config"], config)
                if diff is not None:
                    raise _other_settings(work, diff)
                _check_fingerprint(work, state, calib_fingerprint)
                state["resumes"].append(state["done"])
                state["config"] = config
                logger.info("resuming %s after %d finished blocks", out, state["done"])
            else:
                for entry in work.iterdir():
                    if entry.name != "lock":
                        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                state = {"format": FORMAT, "config": config, "fingerprint": calib_fingerprint, "done": 0,
                         "blocks": [], "hidden": None, "resumes": []}
            (work / "blocks").mkdir(exist_ok=True)
            write_json(work / "run.json", state)
        except BaseException:
            lock.close()
            raise
        return cls(out, state, lock)

    @classmethod
    def follow(cls, out: Path) -> CheckpointFollower:
        """The run rank 0 has just opened in ``work_dir(out)``, read-only (for the other torchrun processes)."""
        work = work_dir(out)
        state = _read_state(work)
        if state is None:
            raise EbftError(f"{work} holds no run state; rank 0 should have written it")
        return CheckpointFollower(out, state, None)

    @property
    def done(self) -> int:
        """How many blocks are finished and saved."""
        return int(self.state["done"])

    @property
    def reports(self) -> list[dict[str, Any]]:
        return list(self.state["blocks"])

    @property
    def resumes(self) -> list[int]:
        return list(self.state["resumes"])

    def remember(self, key: str, value: Any) -> None:
        """Keep ``value`` in the run's state (run.json), for a resumed run to reuse."""
        self.state[key] = value
        write_json(self.folder / "run.json", self.state)

    def _block_file(self, index: int) -> Path:
        return self.folder / "blocks" / f"{index:05d}.safetensors"

    def save_block(self, index: int, block: nn.Module, masks: dict[str, torch.Tensor], hidden: torch.Tensor | None,
                   report: dict[str, Any], commit: bool = True, dense: torch.Tensor | None = None) -> None:
        """Save block ``index``'s state and masks; with ``commit``, also the activations leaving it (and the dense
        model's own, ``dense``, under ``--block-targets dense``), and mark it and the blocks saved uncommitted
        before it finished (a window of blocks tuned together is resumed from its first block: ``hidden`` is
        only meaningful at its last)."""
        pending = self._pending
        if index != self.done + len(pending):
            raise RuntimeError(f"checkpoint: block {index} finished but {self.done + len(pending)} blocks were saved")
        tensors = {f"param.{k}": v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()}
        tensors.update({f"mask.{k}": v.detach().to("cpu").contiguous() for k, v in masks.items()})
        atomic_write(self._block_file(index), lambda tmp: save_file(tensors, str(tmp), metadata={"block": str(index)}))
        if not commit:
            self._pending = [*pending, report]
            return
        self._pending = []
        hidden_name = f"hidden-{index:05d}.pt"
        atomic_write(self.folder / hidden_name, lambda tmp: torch.save(hidden, tmp))
        dense_name = None
        if dense is not None:
            dense_name = f"dense-{index:05d}.pt"
            atomic_write(self.folder / dense_name, lambda tmp: torch.save(dense, tmp))
        previous = [self.state["hidden"], self.state.get("dense")]
        self.state.update(done=index + 1, hidden=hidden_name, dense=dense_name,
                          blocks=[*self.state["blocks"], *pending, report])
        write_json(self.folder / "run.json", self.state)  # the commit point
        for name in previous:
            if name and name not in (hidden_name, dense_name):
                (self.folder / name).unlink(missing_ok=True)

    def block_state(self, index: int) -> dict[str, torch.Tensor]:
        """Finished block ``index``'s saved parameters, by name inside the block."""
        tensors = load_file(str(self._block_file(index)))
        return {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}

    def load_blocks(self, blocks: list[nn.Module], prefixes: list[str],
                    masks: MutableMapping[str, torch.Tensor] | None = None, weights: bool = True) -> None:
        """Put the saved state into the first ``done`` blocks (unless not ``weights``: a streamed model's
        blocks stay on disk), and their masks into ``masks`` by full module name."""
        if self.done > len(blocks):
            raise EbftError(f"the unfinished run in {self.folder} has {self.done} blocks, the model {len(blocks)}; "
                            "pass --overwrite to start over")
        for index in range(self.done):
            tensors = load_file(str(self._block_file(index)))
            state = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
            block_masks = {k[len("mask."):]: v for k, v in tensors.items() if k.startswith("mask.")}
            try:
                if not all(name.startswith(prefixes[index]) for name in block_masks):
                    raise ValueError("mask names")
                expected = {name: p.shape for name, p in blocks[index].named_parameters()}
                if {name: v.shape for name, v in state.items()} != expected:
                    raise ValueError("shapes")
                if weights:
                    blocks[index].load_state_dict(state, strict=True)
            except (RuntimeError, ValueError):
                raise EbftError(f"checkpoint block {index} in {self.folder} does not match the model; "
                                "pass --overwrite to start over") from None
            if masks is not None:
                masks.update(block_masks)

    def load_hidden(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """The activations entering block ``done``."""
        hidden = torch.load(self.folder / self.state["hidden"], map_location="cpu", weights_only=True)
        if like is not None and (hidden.shape != like.shape or hidden.dtype != like.dtype):
            raise EbftError(f"checkpoint activations in {self.folder} have shape {tuple(hidden.shape)}, "
                            f"expected {tuple(like.shape)}; pass --overwrite to start over")
        return hidden

    def load_dense(self) -> torch.Tensor | None:
        """The dense model's own activations entering block ``done`` (``--block-targets dense``), else None."""
        name = self.state.get("dense")
        return None if name is None else torch.load(self.folder / name, map_location="cpu", weights_only=True)

    def stage_model(self, write: Callable[[Path], Any]) -> Any:
        """``write(folder)`` the finished model into ``final/model`` (replacing a half-staged one), fsync it;
        returns what ``write`` returned."""
        final = self.folder / "final"
        if final.exists():
            shutil.rmtree(final)
        final.mkdir()
        written = write(final / "model")
        fsync_tree(final / "model")
        return written

    def publish(self, report: dict[str, Any]) -> None:
        """Write ``final/report.json`` (the staged run is now complete), then rename ``final/`` to ``out``."""
        final = self.folder / "final"
        write_json(final / "report.json", report)
        fsync_path(final)
        publish(self.out)
        self.close()

    def discard(self) -> None:
        """Remove the work folder (nothing worth resuming is in it)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._lock.close()


class CheckpointFollower(Checkpoint):
    """A torchrun process other than rank 0: reads the run rank 0 keeps in the work folder, writes nothing.

    It loads a resumed run's finished blocks and activations like rank 0 does; ``save_block`` only
    counts the block, and nothing of it touches the folder or its lock.
    """

    def save_block(self, index: int, block: nn.Module, masks: dict[str, torch.Tensor], hidden: torch.Tensor | None,
                   report: dict[str, Any], commit: bool = True, dense: torch.Tensor | None = None) -> None:
        pending = [*self._pending, report]
        self._pending = [] if commit else pending
        if commit:
            self.state.update(done=index + 1, blocks=[*self.state["blocks"], *pending])

    def remember(self, key: str, value: Any) -> None:
        self.state[key] = value

    def stage_model(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("only rank 0 saves the model")

    def publish(self, report: dict[str, Any]) -> None:
        raise RuntimeError("only rank 0 publishes the run")

    def discard(self) -> None:
        """Leave the folder to rank 0."""

    def close(self) -> None:
        """No lock to release."""


def publish_staged(out: Path) -> dict[str, Any]:
    """Finish a run that was killed after staging ``final/``: publish it and return its report."""
    work = work_dir(out)
    lock = _lock(work)
    try:
        report = read_report(work / "final")
        if report is None:
            raise EbftError(f"{work / 'final'} holds no report; pass --overwrite to start over")
        publish(out)
    finally:
        lock.close()
    return report


def publish(out: Path) -> None:
    """The last step of a run: ``work_dir(out)/final`` becomes ``out``; the work folder goes away."""
    work = work_dir(Path(out))
    replace_dir(work / "final", Path(out))
    shutil.rmtree(work, ignore_errors=True)


class CheckpointCallback(Callback):
    """The walk's side of a checkpoint: resumes after the finished blocks, commits every new one.

    Under torchrun every process resumes from the folder, and only rank 0 commits.
    """

    def __init__(self, checkpoint: Checkpoint, load_weights: bool = True) -> None:
        self.checkpoint = checkpoint
        self.load_weights = load_weights  # False for a streamed model: finished blocks stay on disk

    def on_walk_start(self, walk: BlockWalk) -> None:
        done = self.checkpoint.done
        if not done:
            return
        blocks = walk.blocks
        for index in range(min(done, len(blocks))):  # load_blocks refuses a checkpoint with more blocks
            walk.compressor.reshape(blocks.blocks[index], index)
        self.checkpoint.load_blocks(list(blocks.blocks), [blocks.block_name(i) + "." for i in range(done)], walk.masks,
                                    weights=self.load_weights)
        walk.resume(done, [BlockReport.from_dict(r) for r in self.checkpoint.reports], self.checkpoint.load_hidden(),
                    self.checkpoint.load_dense())

    def on_block_end(self, walk: BlockWalk, index: int, report: BlockReport) -> None:
        if not walk.is_main:
            return
        prefix = walk.blocks.block_name(index) + "."
        masks = {name: walk.masks[name] for name in walk.masks if name.startswith(prefix)}
        commit = index == walk.window[-1]  # a window of blocks commits at its last
        self.checkpoint.save_block(index, walk.blocks.blocks[index], masks, walk.hidden if commit else None,
                                   report.to_dict(), commit=commit, dense=walk.dense if commit else None)
