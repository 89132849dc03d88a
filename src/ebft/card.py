"""The model card (``DIR/model/README.md``) of a pruned model, the Hugging Face way, from its run report.

YAML front matter (``base_model``, ``library_name: transformers``, ``pipeline_tag``, ``tags``), then what
was done (the pruner, the pattern, the repair method and its settings, the calibration data), the
sparsity achieved, the perplexities the run measured beside the dense model's, and the command that
reproduces the run. ``ebft prune`` measures no zero-shot tasks; ``ebft eval OUT/model --dense DENSE
--tasks ...`` does. Every figure is read from the :class:`ebft.results.RunReport` that ``report.json``
holds, so the card and ``ebft report`` show the same numbers.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

import ebft
from ebft.page import budget_label
from ebft.results import RunReport
from ebft.settings import all_settings, flat_values, options_label, plain, show

__all__ = ["command_line", "model_card"]


def command_line(config: dict[str, Any]) -> str:
    """The ``ebft`` command that runs ``config`` (a RunConfig's ``to_dict()``): every setting not at its default."""
    settings = all_settings()
    values = flat_values(config, settings)
    given = config["prune"]["pruner"] == "given"
    words = ["ebft", "repair", str(values["given_model"]), "--dense", str(config["model"])] if given else \
        ["ebft", "prune", str(config["model"])]
    words += ["--out", "OUT"]
    skip = {"model", "given_model", "pruner"} if given else {"model"}
    if config["prune"].get("nm"):
        skip.add("sparsity")  # --nm sets it
    if config["prune"].get("structured") is not None:
        skip |= {"sparsity", "pruner"}
    for key, s in settings.items():
        if key in skip or key not in values or not s.cli:
            continue
        value = values[key]
        if value == plain(s.default) or (s.kind == "names" and not value and not s.default):
            continue
        if s.kind == "bool":
            words.append(s.flag if value else f"--no-{s.flag[2:]}")
        elif s.repeat:
            for item in value:
                words += [s.flag, str(item)]
        else:
            words += [s.flag, show(s, tuple(value) if isinstance(value, list) else value)]
    return shlex.join(words)


def _base_model(report: RunReport) -> str:
    from ebft.models.loading import ALIASES

    source = str(report.model.get("source") or report.config.get("model", ""))
    alias = ALIASES.get(source)
    return alias[3] if alias is not None and len(alias) > 3 else source


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def model_card(report: RunReport) -> str:
    """The text of ``README.md`` for the model a run saved."""
    cfg = report.config
    prune, finetune, calib = cfg["prune"], cfg["finetune"], cfg["calib"]
    sparsity = report.sparsity or {}
    pattern = sparsity.get("label", "")
    given = prune["pruner"] == "given"
    if prune.get("structured") is not None:
        what, tags = f"structured pruning of {_pct(report.structured['achieved'])} of the blocks' linear parameters " \
                     f"(whole heads and MLP channels, score {prune['structured_score']})" if report.structured else \
                     "structured pruning", ["pruned", "structured-pruning"]
    elif given:
        what, tags = f"the masks of an already pruned model ({prune['options']['model']}): its exact zeros", \
            ["pruned", "sparse"]
    else:
        target = f"{prune['nm'][0]}:{prune['nm'][1]}" if prune.get("nm") else _pct(prune["sparsity"])
        what, tags = f"{prune['pruner']} pruning to {target}", ["pruned", "sparse", prune["pruner"]]
    if sparsity.get("pattern") == "N:M":
        tags.append(f"{sparsity['n']}:{sparsity['m']}-sparsity")
    method = finetune["method"]
    if method != "none":
        tags.append(method)
    tags.append("ebft")
    front = {"base_model": _base_model(report), "library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": tags}
    lines = ["---"]
    for key, value in front.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {json.dumps(item)}" for item in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    lines += ["---", ""]
    title = f"{front['base_model']}, pruned ({pattern or what}) and repaired with {method}" if method != "none" \
        else f"{front['base_model']}, pruned ({pattern or what})"
    lines += [f"# {title}", ""]
    lines += ["Made with [ebft](https://pypi.org/project/ebft/) " + f"{report.ebft_version or ebft.__version__}.", ""]
    lines += ["## What was done", ""]
    lines.append(f"- **Pruning:** {what}; mask pattern: {pattern or 'n/a'}.")
    if method == "none":
        lines.append("- **Repair:** none (pruning alone).")
    else:
        settings = (f"{budget_label(finetune)}, "
                    f"precision {report.precision or finetune['precision']}, held-out fraction "
                    f"{finetune['holdout_fraction']:g}")
        options = options_label(cfg)
        if options:
            settings += ", " + options
        preset = f", preset `{finetune['preset']}`" if finetune.get("preset") else ""
        lines.append(f"- **Repair:** {method}{preset} ({settings}).")
    sampled = calib.get("options") if calib["source"] == "generated" else None
    how = (f", sampled from the dense model at temperature {sampled['temperature']:g}, top-p {sampled['top_p']:g}"
           if sampled else "")
    lines.append(f"- **Calibration data:** {calib['nsamples']} windows of {calib['seqlen']} tokens of "
                 f"`{calib['source']}` (seed {calib['seed']}{how}).")
    if report.model_guard:
        lines.append(f"- **Model guard:** {report.model_guard['decision']}.")
    lines += ["", "## Results", ""]
    lines.append(f"Sparsity of the decoder blocks' linear weights: {_pct(sparsity.get('overall', 0.0))} by mask, "
                 f"{_pct(sparsity.get('weights_zero', 0.0))} exactly 0.0.")
    lines.append("")
    if report.eval:
        dense = report.eval_dense or {}
        lines += ["| perplexity | " + ("dense | " if dense else "") + "this model |",
                  "| --- | " + ("--- | " if dense else "") + "--- |"]
        for source, ppl in report.eval.items():
            details = report.eval_details.get(source, {})
            where = f"`{source}` ({details.get('windows', '?')} windows, {details.get('tokens', '?')} tokens)"
            lines.append(f"| {where} | " + (f"{dense[source]:.2f} | " if source in dense else "") + f"{ppl:.2f} |")
        lines.append("")
    lines += ["## Reproduce", "", "```bash", command_line(cfg), "```", ""]
    lines.append("Loads with `AutoModelForCausalLM.from_pretrained`; the pruned weights are stored as zeros "
                 "(no sparse format).")
    return "\n".join(lines) + "\n"
