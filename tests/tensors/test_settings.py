"""The settings schema: one declaration per setting gives the flags, the sweep keys, the resume check and the docs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ebft.cli import _run_config, build_parser
from ebft.config import FinetuneConfig, PruneConfig, RunConfig
from ebft.errors import UsageError
from ebft.settings import (all_settings, build_run_config, config_diff, fields_settings, flat_values, options_label, plain,
                           settings_doc)
from ebft.sweep.schema import fixed_keys, run_keys

DOCS = Path(__file__).resolve().parents[2] / "docs" / "settings.md"


def _cli(*flags: str) -> RunConfig:
    return _run_config(build_parser().parse_args(["prune", "m", "--out", "o", *flags]))


def test_docs_settings_is_current() -> None:
    assert DOCS.read_text(encoding="utf-8") == settings_doc(), "regenerate: python -m ebft.settings > docs/settings.md"


def test_no_flags_give_the_dataclass_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command line writes no default of its own: with no flags, every setting is the dataclass's."""
    assert _cli() == RunConfig(model="m", out=Path("o"))
    monkeypatch.setenv("COLUMNS", "10000")  # argparse wraps help at the terminal's width
    help_text = build_parser()._subparsers._group_actions[0].choices["prune"].format_help()
    for s in all_settings().values():
        if not s.cli:
            continue
        assert s.flag in help_text
        if s.kind != "bool":
            assert f"(default: {s.default_text()})" in help_text, s.key


def test_every_flag_is_a_sweep_key_and_back() -> None:
    settings = all_settings()
    keys = {**run_keys(), **{k: s for k, s in fixed_keys().items() if settings.get(k) == s}}
    for key, s in settings.items():
        assert (key in keys) == (s.sweep is not None), key
    assert set(run_keys()) == {k for k, s in settings.items() if s.sweep == "axis"} and "model" in run_keys()
    assert {"percdamp", "lora_rank", "dsnot_cycles", "compile", "structured", "offload"} <= set(run_keys())


def test_flags_reach_the_config_and_flat_values_read_them_back() -> None:
    cfg = _cli("--pruner", "sparsegpt", "--percdamp", "0.05", "--nm", "2:4", "--finetune", "lora", "--lora-rank",
               "4", "--lora-targets", "q_proj,v_proj", "--betas", "0.8,0.9", "--eval", "pydoc", "--eval", "c4")
    assert cfg.prune.nm == (2, 4) and cfg.prune.options.percdamp == 0.05 and cfg.prune.sparsity == 0.5
    assert cfg.finetune.options.rank == 4 and cfg.finetune.options.targets == ("q_proj", "v_proj")
    assert cfg.finetune.betas == (0.8, 0.9) and cfg.eval.sources == ["pydoc", "c4"]
    values = flat_values(cfg)
    assert values["lora_rank"] == 4 and values["percdamp"] == 0.05 and "dsnot_cycles" not in values
    settings = all_settings()
    given = {k: v for k, v in values.items() if k != "model" and v != plain(settings[k].default)}
    rebuilt = build_run_config(given, model="m", out=Path("o"))
    assert rebuilt == cfg
    assert flat_values(cfg.to_dict()) == values  # the same from report.json's form


@pytest.mark.parametrize("flags,message", [
    (("--lora-rank", "4"), "--lora-rank applies only to --finetune lora, not ebft; drop it"),
    (("--finetune", "none", "--compile"), "--compile applies only to --finetune ebft, not none; drop it"),
    (("--percdamp", "0.1"), "--percdamp applies only to --pruner sparsegpt, not wanda; drop it"),
    (("--sparsity", "0.5", "--nm", "2:4"), "--sparsity and --nm exclude each other"),
    (("--structured", "0.25", "--nm", "2:4"), "does not combine with --sparsity or --nm"),
    (("--structured", "0.25", "--pruner", "wanda"), "not --pruner; drop --pruner"),
    (("--structured-score", "magnitude"), "--structured-score needs --structured RATIO"),
])
def test_conflicting_flags_are_refused(flags: tuple[str, ...], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _cli(*flags)


def test_options_label_names_the_options_that_differ_from_their_defaults_as_flags() -> None:
    cfg = build_run_config({"finetune": "kd", "kd_lr": 1e-4, "kd_epochs": 2, "kd_block_lr_search": (4.0, 0.25),
                            "kd_top_k": 64, "lr": 1e-3}, model="m")
    # the stage's own rate beside the walk's, each under its flag; kd_top_k is at its default, the common lr is
    # not an option
    assert options_label(cfg) == "--kd-block-lr-search 4,0.25, --kd-lr 0.0001, --kd-epochs 2"
    assert options_label(cfg.to_dict()) == options_label(cfg)
    assert options_label(build_run_config({"finetune": "ebft"}, model="m")) == ""
    assert options_label(build_run_config({"pruner": "sparsegpt", "percdamp": 0.1}, model="m"), "pruner") == \
        "--percdamp 0.1"


def test_config_diff_names_the_flag() -> None:
    base = RunConfig(model="m", finetune=FinetuneConfig(method="lora", options={"rank": 8}))
    other = dataclasses.replace(base, finetune=FinetuneConfig(method="lora", options={"rank": 16}))
    assert config_diff(base.to_dict(), other.to_dict()) == "--lora-rank was 8, now 16"
    nm = dataclasses.replace(base, prune=PruneConfig(nm=(2, 4)))
    assert config_diff(base.to_dict(), nm.to_dict()).startswith("--nm was none, now 2:4")
    moved = dataclasses.replace(base, out=Path("elsewhere"), eval=dataclasses.replace(base.eval, sources=["pydoc"]))
    assert config_diff(base.to_dict(), moved.to_dict()) is None  # neither changes the pruned model
    assert config_diff(base.to_dict(), dataclasses.replace(base, model="n").to_dict()) == "MODEL was 'm', now 'n'"


def test_two_settings_may_not_share_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from ebft.finetune import FINETUNERS
    from ebft.finetune.ebft import EBFT, EBFTOptions
    from ebft.settings import setting

    @dataclasses.dataclass
    class Clash:
        lr: float = setting(1.0, key="lr", help="a second lr")

    class Other(EBFT):
        Options = Clash

    monkeypatch.setitem(FINETUNERS, "clash", Other)
    with pytest.raises(ValueError, match="two settings share the key 'lr'"):
        all_settings()
    assert [s.key for s in fields_settings(EBFTOptions, ())] == ["compile", "lr_search", "lr_trial_steps"]
