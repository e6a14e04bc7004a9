"""The command line users script against does not lose a flag: every sub-command of `predmaps`,
`python -m predmaps.run_cli` and `predmaps-convert` still takes (and its --help still lists) every flag
and choice it took at commit 8ddc185, before issue 25 split the CLI into predmaps/cli/. New flags and
choices are allowed; a removed one fails here.

The lists below were written out from 8ddc185's own parsers (its cli.py, run_cli.py, eval_cli.py and
convert/__main__.py, walked the way `_parsers` walks today's), not from today's code."""

from __future__ import annotations

import argparse

import pytest

# command -> its flags (positionals by dest) at 8ddc185
FLAGS_8DDC185 = {
    "predmaps": ["--help", "-h"],
    "predmaps explain": ["--alpha", "--batch-size", "--classes", "--cmap", "--heads", "--help", "--labels", "--layers",
                         "--map-class", "--method", "--model", "--model-name", "--out", "--shared-scale", "--strict",
                         "--top-k", "-h", "images"],
    "predmaps demo": ["--alpha", "--cmap", "--help", "--model", "--model-name", "--n", "--out", "--seed", "-h"],
    "predmaps eval": ["--help", "-h"],
    "predmaps eval perturbation": ["--batch-size", "--class-order", "--data", "--help", "--image-size", "--json",
                                   "--labels", "--layer", "--limit", "--maps", "--method", "--mode", "--model",
                                   "--model-name", "--normalization", "--option", "--quiet", "--save-maps", "--seed",
                                   "--subset", "--target", "--transform", "--workers", "-h"],
    "predmaps eval segmentation": ["--batch-size", "--data", "--help", "--image-size", "--json", "--layer", "--limit",
                                   "--maps", "--method", "--model", "--model-name", "--normalization", "--option",
                                   "--quiet", "--seed", "--subset", "--transform", "--workers", "-h"],
    "predmaps eval digits": ["--batch-size", "--help", "--json", "--layer", "--markdown", "--method", "--model",
                             "--model-name", "--option", "--quiet", "--scenes", "--seed", "--target", "-h"],
    "predmaps run": ["--batch-size", "--coordinator", "--distributed", "--dtype", "--help", "--images", "--labels",
                     "--layers", "--map-dtype", "--method", "--model", "--model-name", "--no-progress",
                     "--num-processes", "--out", "--prefetch", "--process-id", "--resume", "--retry-failed",
                     "--shard-size", "--strict", "--target", "--verify-inputs", "--workers", "-h"],
    "predmaps-run": ["--help", "-h"],
    "predmaps-run run": ["--batch-size", "--coordinator", "--distributed", "--dtype", "--help", "--images", "--labels",
                         "--layers", "--map-dtype", "--method", "--model", "--model-name", "--no-progress",
                         "--num-processes", "--out", "--prefetch", "--process-id", "--resume", "--retry-failed",
                         "--shard-size", "--strict", "--target", "--verify-inputs", "--workers", "-h"],
    "predmaps-convert": ["--help", "--img-size", "--model-name", "--out", "--to-timm", "-h", "source"],
}

# "command flag" -> its choices at 8ddc185
CHOICES_8DDC185 = {
    "predmaps eval perturbation --subset": ["first", "random"],
    "predmaps eval perturbation --target": ["gt", "pred"],
    "predmaps eval perturbation --mode": ["both", "negative", "positive"],
    "predmaps eval perturbation --class-order": ["imagenet", "sorted"],
    "predmaps eval perturbation --transform": ["resize", "timm"],
    "predmaps eval perturbation --normalization": ["model", "protocol"],
    "predmaps eval segmentation --subset": ["first", "random"],
    "predmaps eval segmentation --transform": ["resize", "timm"],
    "predmaps eval segmentation --normalization": ["model", "protocol"],
    "predmaps eval digits --target": ["gt", "pred"],
    "predmaps run --dtype": ["bf16", "bfloat16", "f16", "f32", "float16", "float32", "fp16", "fp32"],
    "predmaps run --map-dtype": ["f16", "f32", "float16", "float32", "fp16", "fp32"],
    "predmaps run --distributed": ["auto", "off", "on"],
}


class _Parsed(Exception):
    pass


def _parser_of(main, argv, monkeypatch) -> argparse.ArgumentParser:
    """The parser `main` builds, taken where it would parse (nothing runs)."""
    got = {}

    def stop(self, *args, **kwargs):
        got["parser"] = self
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    with pytest.raises(_Parsed):
        main(argv)
    monkeypatch.undo()
    return got["parser"]


def _parsers(parser, name, out):
    """{command: parser} for `parser` and every sub-command under it."""
    out[name] = parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                _parsers(p, f"{name} {sub}", out)
    return out


@pytest.fixture(scope="module")
def parsers():
    from convert.__main__ import main as convert_main
    from predmaps import cli, run_cli

    with pytest.MonkeyPatch.context() as mp:
        out = _parsers(_parser_of(cli.main, ["explain"], mp), "predmaps", {})
        _parsers(_parser_of(run_cli.main, [], mp), "predmaps-run", out)
        _parsers(_parser_of(convert_main, [], mp), "predmaps-convert", out)
    return out


def _flags(parser) -> set[str]:
    return {s for a in parser._actions if not isinstance(a, argparse._SubParsersAction)
            for s in (a.option_strings or [a.dest])}


@pytest.mark.parametrize("command", FLAGS_8DDC185)
def test_every_flag_of_8ddc185_is_still_taken_and_listed_in_help(command, parsers):
    assert command in parsers, f"the sub-command `{command}` is gone"
    parser = parsers[command]
    missing = set(FLAGS_8DDC185[command]) - _flags(parser)
    assert not missing, f"`{command}` lost {sorted(missing)}"
    text = parser.format_help()
    unlisted = [f for f in FLAGS_8DDC185[command] if f.startswith("-") and f not in text]
    assert not unlisted, f"`{command} --help` does not list {unlisted}"


@pytest.mark.parametrize("key", CHOICES_8DDC185)
def test_every_choice_of_8ddc185_is_still_accepted(key, parsers):
    command, flag = key.rsplit(" ", 1)
    [action] = [a for a in parsers[command]._actions if flag in a.option_strings]
    assert set(CHOICES_8DDC185[key]) <= set(map(str, action.choices))
