"""``ebft sweep CONFIG.yaml``: run a grid of ``ebft prune`` runs, resumably, and summarise it like the paper.

The config is YAML with up to three keys::

    grid:                      # axes: lists; every combination is one cell
      pruner: [magnitude, wanda, sparsegpt]
      sparsity: [0.5, 0.6, 0.7, 0.8, "2:4", "4:8"]
      finetune: [none, ebft]
    fixed:                     # one value each
      model: smollm2-135m
      calib: c4
      nsamples: 64
      seqlen: 256
      eval: [wikitext2:test]
      max_windows: 16
    out: runs/study           # optional; --out wins; default runs/<config name>

Any run setting (:data:`RUN_KEYS`: the ``ebft prune`` flags, with ``_`` for ``-``, ``calib`` for
``--calib``, ``finetune`` for ``--finetune``, ``sparsity`` taking a fraction or an ``"N:M"`` pattern)
may be a grid axis or fixed. Settings that only ``fixed`` takes (:data:`FIXED_KEYS`) say how cells
are evaluated: perplexity sources, zero-shot tasks, the dense baseline, the data folder. Paths are
relative to the current folder. The whole config is checked before any model is loaded: an
unknown key, a bad value or an empty axis is a one-line error naming the key.

Output, in ``OUT``::

    cells/<cell-id>.json   one per finished cell, written atomically: its settings and the run's report
                           (perplexities, per-block losses and epoch losses, sparsity, timings) plus
                           zero-shot results; the dense baseline is cells/dense.<model>.json
    summary.md             tables like the paper's: perplexity per pruner x sparsity x method, a
                           calibration-size table when nsamples varies, zero-shot accuracy
    plots/                 perplexity vs sparsity per eval source; final/init loss per block over cells;
                           per tuned cell: reconstruction loss before/after per block and the loss curves
    models/<cell-id>/      only with keep_models (--keep-models): each cell's model, 540 MB for SmolLM2

A cell whose JSON exists is skipped on the next run, so an interrupted sweep continues where it
stopped; a cell interrupted half-way is recomputed. Several workers (one per GPU, or per machine on a
shared folder) may run the same sweep at once: a worker claims a cell with ``cells/<cell-id>.json.running``
before computing it and the others pass it by; a claim whose process has died (on the same host) is
taken over. A cell JSON written with other settings (say,
after ``fixed.lr`` changed) is refused with a message rather than silently reused.

What is shared between cells, and what is not:

- each model is loaded once; its dense weights are kept as a CPU copy and put back before every
  cell (``load_state_dict``) instead of reloading;
- calibration windows are built once per (model, source, nsamples, seqlen, seed), and evaluation
  windows once per (model, source, seqlen, max windows);
- the dense model is evaluated once per model (perplexity on every eval source, zero-shot tasks);
- cells with ``finetune: none`` do not depend on the training settings (epochs, lr, batch size, ...):
  grid axes over those collapse into one such cell per pruner, sparsity and calibration set;
- dense block targets are not shared: EBFT's target for block ``i`` is the dense block applied to the
  cell's own pruned (and tuned) activations, which differ in every cell from block 1 on;
- a ``finetune: none`` cell's pruned model is not reused as another cell's starting point: the
  pipeline prunes block ``i`` on activations that passed through the already-tuned blocks before it,
  so a tuned cell never goes through the prune-only model.
"""

from ebft.sweep.cells import FORMAT, Plan, check_sweep, claim_cell, plan_sweep, read_cell
from ebft.sweep.runner import SweepResult, run_sweep
from ebft.sweep.schema import Cell, Sweep, SweepOptions, cell_id, fixed_keys, load_sweep, read_config, run_keys
from ebft.sweep.summary import build_summary, describe, write_summary

__all__ = ["FORMAT", "Cell", "Plan", "Sweep", "SweepOptions", "SweepResult", "build_summary", "cell_id", "check_sweep",
           "claim_cell", "describe", "fixed_keys", "load_sweep", "plan_sweep", "read_cell", "read_config", "run_keys",
           "run_sweep", "write_summary"]
