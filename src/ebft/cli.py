"""Command line: a thin layer that parses flags into config objects and calls the library."""

from __future__ import annotations

import argparse
import contextlib
import logging
import logging.handlers
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator, Sequence

from ebft.config import EvalConfig, RunConfig
from ebft.errors import EbftError, UsageError

logger = logging.getLogger("ebft")


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see: {self.prog} --help)")


def _common(p: argparse.ArgumentParser) -> None:
    """--device and --data-dir (the run settings' own flags), and the output flags."""
    from ebft.settings import add_flags, all_settings

    settings = all_settings()
    add_flags(p, [settings["device"], settings["data_dir"]], with_defaults=True)
    _output_flags(p)


def build_parser() -> argparse.ArgumentParser:
    from ebft.settings import add_flags, all_settings

    parser = _Parser(prog="ebft", description="Prune a causal LM and repair it with block-wise fine-tuning (EBFT).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prune", help="prune a model, repair it block by block, evaluate and save it")
    p.add_argument("model", help="hub id, local folder, .gguf file, or the alias smollm2-135m")
    p.add_argument("--out", type=Path, required=True, help="run folder: model/ (HF format) and report.json")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds something")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished run of --out (same flags) from its last finished block")
    add_flags(p, all_settings().values())  # every run setting, methods' options included (docs/settings.md)
    _output_flags(p)

    rp = sub.add_parser("repair", help="repair a model another tool pruned: its zeros are the masks, the dense model "
                                       "gives the targets")
    rp.add_argument("sparse", type=Path, help="the pruned model: a local folder of safetensors weights (any dtype, "
                                              "sharded or not) whose zeros are the masks")
    rp.add_argument("--dense", required=True, help="the dense model it was pruned from: hub id, folder, .gguf file "
                                                   "or alias")
    rp.add_argument("--out", type=Path, required=True, help="run folder: model/ (HF format) and report.json")
    rp.add_argument("--overwrite", action="store_true", help="replace --out if it already holds something")
    rp.add_argument("--resume", action="store_true", help="continue the unfinished run of --out (same flags)")
    add_flags(rp, [s for s in all_settings().values() if s.path[0] != "prune"])  # the pruning is given
    _output_flags(rp)

    e = sub.add_parser("eval", help="perplexity on a data source and/or zero-shot accuracy on lm-eval tasks")
    e.add_argument("model", nargs="+", help="one or more models: hub id, local folder (e.g. RUN/model), .gguf file, "
                                            "or smollm2-135m; several are compared in one table")
    e.add_argument("--dense", default=None, help="the dense model, evaluated first and marked in the table")
    e.add_argument("--data", action="append", default=None, metavar="SOURCE",
                   help="perplexity source (repeatable): wikitext2, c4, pydoc, text:PATH, jsonl:PATH (this and/or "
                        "--tasks)")
    seqlen = all_settings()["eval_seqlen"]
    e.add_argument("--seqlen", type=int, default=seqlen.default,
                   help=f"tokens per perplexity window (default {seqlen.default})")
    e.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    e.add_argument("--tasks", default=None,
                   help="zero-shot tasks, comma-separated: boolq, rte, winogrande, arc_easy, arc_challenge, "
                        "openbookqa, piqa, hellaswag")
    e.add_argument("--limit", type=int, default=None,
                   help="score only the first N examples of each task, in the split's file order")
    e.add_argument("--zeroshot-backend", default="auto",
                   help="auto (lm-eval when installed and the hub answers, else local files), harness or local")
    e.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass for --tasks (default 8)")
    e.add_argument("--json", type=Path, default=None,
                   help="write the results to this file: {perplexity, tokens, windows} and/or {tasks, mean_acc}")
    _common(e)

    d = sub.add_parser("demo", help="offline demo: SmolLM2-135M, Wanda 50%% + EBFT, on CPython's documentation")
    d.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (default runs/demo)")
    d.add_argument("--overwrite", action="store_true", default=True, help=argparse.SUPPRESS)
    _common(d)

    w = sub.add_parser("sweep", help="run a grid of prune runs from a YAML config (resumable); tables and plots")
    w.add_argument("config", type=Path, help="YAML file with grid: (axes, lists) and fixed: (settings)")
    w.add_argument("--out", type=Path, default=None, help="output folder (default: the config's out, else runs/NAME)")
    w.add_argument("--dry-run", action="store_true", help="check the config, list the cells and stop")
    w.add_argument("--keep-models", action="store_true", help="save each cell's model under OUT/models/ (large)")
    w.add_argument("--summary-only", action="store_true",
                   help="only (re)write summary.md and the plots from the cells finished so far; run nothing")
    _output_flags(w)

    r = sub.add_parser("report", help="render a run's report.json as report.md (and report.html) with plots")
    r.add_argument("folder", type=Path, help="a run folder written by ebft prune --out")
    r.add_argument("--html", action="store_true", help="also write report.html")
    _output_flags(r)
    return parser


def _output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    p.add_argument("--quiet", action="store_true", help="only warnings and the final results")


def _run_config(args: argparse.Namespace) -> RunConfig:
    """The run the flags describe: every given flag, every other setting at its default."""
    from ebft.settings import all_settings, build_run_config, given_values

    return build_run_config(given_values(args, all_settings().values()), model=args.model, out=args.out)


def _cmd_prune(args: argparse.Namespace) -> int:
    return _prune_and_print(args, _run_config(args))


def _cmd_repair(args: argparse.Namespace) -> int:
    from ebft.settings import all_settings, build_run_config, given_values

    values = given_values(args, [s for s in all_settings().values() if s.path[0] != "prune"])
    cfg = build_run_config({**values, "pruner": "given", "given_model": str(args.sparse)}, model=args.dense,
                           out=args.out)
    return _prune_and_print(args, cfg)


def _prune_and_print(args: argparse.Namespace, cfg: RunConfig) -> int:
    """``ebft prune`` and ``ebft repair``: check, run (under torchrun, with the other processes), print."""
    from ebft.distributed import torchrun_world
    from ebft.finetune import ModelResult
    from ebft.runner import preflight, run_prune

    world = torchrun_world()
    if world is not None:  # the device each process of a torchrun job gets, checked first
        from ebft.distributed import process_device

        process_device(cfg.device, world[2])
    with _held_logs(args.debug):  # a failed check is one line; its progress logs are not shown
        checked = preflight(cfg, overwrite=args.overwrite, resume=args.resume, processes=world[1] if world else 1)
    dist = _join_torchrun(cfg.device)
    try:
        report = run_prune(cfg, overwrite=args.overwrite, resume=args.resume, dist=dist, checked=checked)
    finally:
        if dist is not None:
            dist.close()
    if dist is not None and not dist.is_main:
        return 0  # rank 0 prints the results
    if report.structured is not None:
        st = report.structured
        print(f"removed {st['achieved']:.2%} of {report.model['source']}'s block parameters (asked "
              f"{st['requested']:.2%}): heads {st['heads'][0]} -> {st['heads'][1]}, key/value heads "
              f"{st['kv_heads'][0]} -> {st['kv_heads'][1]}, MLP channels {st['intermediate'][0]} -> "
              f"{st['intermediate'][1]}; {st['parameters_before']:,} -> {st['parameters_after']:,} parameters "
              f"(score {st['score']}, finetune {cfg.finetune.method})")
    elif cfg.prune.pruner == "given":
        print(f"repaired {cfg.prune.options.model}: {report.sparsity['overall']:.2%} sparsity "
              f"({report.sparsity.get('label', '')}), targets from {report.model['source']}, finetune "
              f"{cfg.finetune.method}")
    else:
        print(f"pruned {report.model['source']} to {report.sparsity['overall']:.2%} sparsity "
              f"({cfg.prune.pruner}, {cfg.prune.label}, finetune {cfg.finetune.method})")
    if report.model_stage is not None:
        print(ModelResult(**report.model_stage).summary() + " (masks kept)")
    elif cfg.finetune.method != "none":
        print(f"blocks whose reconstruction loss dropped: {report.improved_blocks}/{len(report.blocks)}")
        if report.restored_blocks:
            print(f"blocks given back their untuned pruned weights (see 'restored' in report.json): "
                  f"{', '.join(map(str, report.restored_blocks))}")
    if report.model_guard is not None:
        from ebft.guard import kept_blocks_text

        for line in kept_blocks_text(report.model_guard):
            print(line)
    if report.resumed:
        done = ", ".join(str(n) for n in report.resumed)
        print(f"resumed {len(report.resumed)} time(s), with {done} block(s) already finished")
    for source, ppl in (report.eval_dense or {}).items():
        print(f"dense perplexity on {source}: {ppl:.3f}")
    for source, ppl in report.eval.items():
        print(f"perplexity on {source}: {ppl:.3f}")
    print(f"wrote {args.out}/model and {args.out}/report.json in {report.timings['total']:.0f} s")
    return 0


@contextlib.contextmanager
def _held_logs(debug: bool) -> Iterator[None]:
    """Log records made inside wait: shown once the block succeeds, dropped if it raises (unless ``debug``),
    so that a failed check prints its one-line error and nothing else."""
    if debug:
        yield
        return
    root = logging.getLogger()
    handlers = root.handlers[:]
    held = logging.handlers.BufferingHandler(capacity=1_000_000)
    root.handlers = [held]
    try:
        yield
    finally:
        root.handlers = handlers
    for record in held.buffer:  # only reached on success
        root.handle(record)


def _join_torchrun(device: str):
    """Under ``torchrun --nproc-per-node K`` (K > 1): join the job; only rank 0 logs below warnings and shows bars."""
    from ebft.distributed import init_from_env

    dist = init_from_env(device)
    if dist is not None and not dist.is_main:
        logging.getLogger("ebft").setLevel(logging.WARNING)
        os.environ["TQDM_DISABLE"] = "1"
    return dist


def _pm(value: float, stderr: float | None) -> str:
    """``0.4200 ± 0.0350`` (the standard error), or the value alone."""
    return f"{value:.4f}" if stderr is None else f"{value:.4f} ± {stderr:.4f}"


def _cmd_eval(args: argparse.Namespace) -> int:
    from ebft.data import check_evaluation_source, load_documents, parse_source
    from ebft.fsio import write_json
    from ebft.models.loading import load_config
    from ebft.runner import check_context_length, resolve_device

    sources = list(dict.fromkeys(args.data or []))
    if not sources and args.tasks is None:
        raise UsageError("give --data SOURCE (perplexity), --tasks LIST (zero-shot accuracy), or both")
    for source in sources:
        check_evaluation_source(source, "--data")
    cfg = None
    if sources:
        if args.seqlen < 2:
            raise UsageError(f"--seqlen must be at least 2; got {args.seqlen}")
        cfg = EvalConfig(sources=sources, seqlen=args.seqlen, max_windows=args.max_windows)
    tasks, backend, plan = None, None, None
    if args.tasks is not None:
        from ebft.eval.zeroshot import parse_tasks, plan_local, select_backend

        tasks = parse_tasks(args.tasks)
        if args.limit is not None and args.limit < 1:
            raise UsageError(f"--limit must be a positive whole number; got {args.limit}")
        if args.batch_size < 1:
            raise UsageError(f"--batch-size must be a positive whole number; got {args.batch_size}")
        backend, why = select_backend(args.zeroshot_backend)
        logger.info("zero-shot back-end: %s (%s)", backend, why)
        if backend == "local":
            plan = plan_local(tasks, args.data_dir)  # fails now, before loading the model, if files are missing
    device = resolve_device(args.device)
    for source in sources:
        parse_source(source)
        load_documents(source, "evaluation", args.data_dir)
    if args.json is not None and args.json.is_dir():
        raise UsageError(f"--json {args.json} is a folder; give a file path such as {args.json / 'eval.json'}")
    if args.json is not None and not args.json.parent.is_dir():
        raise UsageError(f"--json {args.json}: folder {args.json.parent} does not exist")
    models = [*([args.dense] if args.dense else []), *(m for m in args.model if m != args.dense)]
    for spec in models:  # every model's config before the first one's weights load
        model_config = load_config(spec)
        if cfg is not None:
            check_context_length(model_config, cfg.seqlen, "--seqlen")
    results = []
    for spec in models:
        result = _evaluate_model(spec, cfg, tasks, backend, plan, args, device)
        result["role"] = "dense" if spec == args.dense else "model"
        results.append(result)
    if len(results) > 1:
        _print_table(results, sources)
    if args.json is not None:
        if len(results) == 1 and len(sources) <= 1:  # one model, one source: the flat form
            one = results[0]
            write_json(args.json, {**(one["perplexity"][sources[0]] if sources else {}), **(one["zeroshot"] or {})})
        else:
            write_json(args.json, {"models": results})
    return 0


def _evaluate_model(spec: str, cfg: EvalConfig | None, tasks: list[str] | None, backend: str | None, plan: object,
                    args: argparse.Namespace, device: object) -> dict:
    """One model's perplexity on every source and zero-shot accuracy, printed; returns them."""
    from ebft.data import evaluation_tokens
    from ebft.eval import perplexity
    from ebft.models import load_model

    loaded = load_model(spec)
    out: dict = {"model": spec, "perplexity": {}, "zeroshot": None}
    for source in (cfg.sources if cfg is not None else []):
        windows = evaluation_tokens(loaded.tokenizer, source, cfg.seqlen, cfg.max_windows, data_dir=args.data_dir)
        result = perplexity(loaded.model, windows, device=device, desc=f"eval {source}")
        print(f"{spec}: perplexity on {source}: {result.perplexity:.3f} ({result.tokens} tokens, {result.windows} "
              f"windows of {cfg.seqlen})")
        out["perplexity"][source] = result.to_dict()
    if tasks is not None:
        from ebft.eval.zeroshot import evaluate_harness, evaluate_local

        if backend == "harness":
            zs = evaluate_harness(loaded.model, loaded.tokenizer, tasks, limit=args.limit,
                                  batch_size=args.batch_size, device=device)
        else:
            zs = evaluate_local(loaded.model, loaded.tokenizer, plan.run, data_dir=args.data_dir, limit=args.limit,
                                batch_size=args.batch_size, device=device)
            zs.skipped.update(plan.skipped)
        scope = f"first {args.limit} examples per task" if args.limit is not None else "all examples"
        print(f"{spec}: zero-shot accuracy ({zs.backend} back-end, {scope}, {zs.seconds:.0f} s):")
        result = zs.to_dict()
        for name, r in result["tasks"].items():
            norm = f"  acc_norm {_pm(r['acc_norm'], r.get('acc_norm_stderr'))}" if "acc_norm" in r else ""
            print(f"  {name:<14} acc {_pm(r['acc'], r.get('acc_stderr'))}{norm}  (n={r['n']})")
        for name in zs.skipped:
            print(f"  {name:<14} skipped: not available offline")
        print(f"mean acc over {len(zs.tasks)} tasks: {_pm(result['mean_acc'], result.get('mean_acc_stderr'))}")
        out["zeroshot"] = result
    return out


def _print_table(results: list[dict], sources: list[str]) -> None:
    """Every model side by side: perplexity per source, accuracy per task, the mean accuracy."""
    tasks = list(dict.fromkeys(t for r in results if r["zeroshot"] for t in r["zeroshot"]["tasks"]))
    header = ["model", *(f"ppl {s}" for s in sources), *tasks, *(["mean acc"] if tasks else [])]
    rows = []
    for r in results:
        name = r["model"] + (" (dense)" if r["role"] == "dense" else "")
        row = [name, *(f"{r['perplexity'][s]['perplexity']:.3f}" for s in sources)]
        zs = r["zeroshot"] or {"tasks": {}}
        row += [f"{zs['tasks'][t]['acc']:.4f}" if t in zs["tasks"] else "-" for t in tasks]
        if tasks:
            row.append(f"{zs['mean_acc']:.4f}" if "mean_acc" in zs else "-")
        rows.append(row)
    print("")
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def _cmd_demo(args: argparse.Namespace) -> int:
    from ebft.demo import run_demo

    run_demo(out=args.out, device=args.device, data_dir=args.data_dir, echo=print)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from ebft.sweep import check_sweep, describe, load_sweep, plan_sweep, run_sweep, write_summary

    if args.summary_only and args.dry_run:
        raise UsageError("--summary-only and --dry-run exclude each other; choose one")
    sweep = load_sweep(args.config, out=args.out, keep_models=True if args.keep_models else None)
    if args.summary_only:
        plan = plan_sweep(sweep)  # refuses cell files written with other settings
        print(f"sweep {args.config}: {len(plan.done)} of {len(sweep.cells)} cells finished; wrote "
              f"{write_summary(sweep)}")
        return 0
    plan = check_sweep(sweep)
    print(f"sweep {args.config}: {len(sweep.cells)} cells, {len(plan.done)} finished, {len(plan.todo)} to run "
          f"-> {sweep.out}")
    if args.dry_run:
        for line in describe(sweep, plan):
            print(f"  {line}")
        return 0
    result = run_sweep(sweep, plan)
    others = f", left {len(result.others)} to other workers" if result.others else ""
    print(f"ran {len(result.computed)} cell(s), skipped {len(result.skipped)} finished{others}; wrote {result.summary}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ebft.report import render_report

    written = render_report(args.folder, html_page=args.html)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    if not args.debug:
        # third-party chatter (weights conversion bars, deprecation notes) is not ours to show
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a batch scheduler's time limit), raised where the run is so that its clean-up
    runs: half-written outputs stay under their temporary names and a sweep releases its claims."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    # Not under torchrun: its agent stops the workers with SIGTERM while they may sit in a collective,
    # where a Python handler would only run once the collective returns.
    under_torchrun = False
    if "WORLD_SIZE" in os.environ:  # only then is ebft.distributed (and torch) worth importing here
        from ebft.distributed import torchrun_world

        under_torchrun = torchrun_world() is not None
    if threading.current_thread() is not threading.main_thread() or under_torchrun:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if "--quiet" in words and "tqdm" not in sys.modules:
        # every tqdm bar, ours and third-party ones such as transformers' GGUF conversion, which ignores
        # transformers' own switch; tqdm (>= 4.66) reads TQDM_* variables once, when it is imported
        os.environ["TQDM_DISABLE"] = "1"
    parser = build_parser()
    debug = "--debug" in words
    try:
        args = parser.parse_args(argv)
        _setup_logging(args)
        if args.threads is not None:
            if args.threads < 1:
                raise UsageError(f"--threads must be a positive whole number; got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        handler = {"prune": _cmd_prune, "repair": _cmd_repair, "eval": _cmd_eval, "demo": _cmd_demo,
                   "sweep": _cmd_sweep, "report": _cmd_report}[args.command]
        with _sigterm_raises():
            return handler(args)
    except EbftError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (OSError, MemoryError) as exc:  # disk full, permissions, out of memory: runtime failures
        if debug:
            raise
        print(f"error: {_describe(exc)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        if debug or type(exc).__name__ != "OutOfMemoryError":  # a bug: keep its traceback
            raise
        print(f"error: out of memory: {str(exc).splitlines()[0]}; lower --batch-size or use another --device",
              file=sys.stderr)
        return 1


def _describe(exc: BaseException) -> str:
    """One line for an OS-level failure: what failed and on which file."""
    if isinstance(exc, MemoryError):
        return "out of memory; lower --nsamples, --seqlen or --batch-size"
    assert isinstance(exc, OSError)
    what = exc.strerror or str(exc) or type(exc).__name__
    return f"{what}: {exc.filename}" if exc.filename else what


if __name__ == "__main__":
    sys.exit(main())
