"""Every command line documents every flag in its --help (grouped where there are many)."""

from __future__ import annotations

import argparse
import importlib

import pytest

CLIS = ["training.__main__", "export.__main__", "export.samples", "export.reliability", "serving.__main__",
        "serving.client", "loadtest.resilience", "loadtest.openloop", "loadtest.stall_server", "loadtest.stall_demo"]


class _Captured(Exception):
    pass


def _parser_of(module: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser ``module.main`` builds, captured at its parse_args call (nothing runs)."""
    seen = []

    def capture(self, *args, **kwargs):
        seen.append(self)
        raise _Captured

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_intermixed_args", capture)
    with pytest.raises(_Captured):
        importlib.import_module(module).main([])
    return seen[0]


def _walk(parser: argparse.ArgumentParser, prog: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{prog} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield prog, parser, action


@pytest.mark.parametrize("module", CLIS)
def test_every_flag_has_help(module, monkeypatch):
    parser = _parser_of(module, monkeypatch)
    missing = [f"{prog} {'/'.join(a.option_strings) or a.dest}" for prog, _, a in _walk(parser, module)
               if not (a.help or "").strip()]
    assert not missing, f"flags without help text: {missing}"
    for prog, sub, _ in _walk(parser, module):
        flags = [a for a in sub._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
        if len(flags) > 12:  # a long --help is grouped (as timm's train.py is), not one flat list
            titled = [g for g in sub._action_groups if g.title not in ("options", "positional arguments")
                      and g._group_actions]
            assert len(titled) >= 3, f"{prog}: {len(flags)} flags in {len(titled)} groups"


def test_help_formatter_shows_defaults_once():
    from training.cli import HelpFormatter

    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument("--a", type=int, default=3, help="a number")
    p.add_argument("--b", default=None, help="default: computed")
    p.add_argument("--c", default=1, help="one (default: %(default)s)")
    text = " ".join(p.format_help().split())
    assert "a number (default: 3)" in text and "default: computed" in text
    assert text.count("(default: 1)") == 1 and "(default: None)" not in text


@pytest.mark.parametrize("module, config", [("export.__main__", "export.core:ExportConfig"),
                                            ("training.__main__", "training.config:TrainConfig")])
def test_every_flag_reaches_the_config(module, config, monkeypatch):
    """training.cli.from_args maps flags to config fields by name: a flag whose dest is not a field
    would be parsed and then silently dropped."""
    import dataclasses

    mod, name = config.split(":")
    fields = {f.name for f in dataclasses.fields(getattr(importlib.import_module(mod), name))}
    parser = _parser_of(module, monkeypatch)
    if module == "training.__main__":  # the train subcommand
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    dests = {a.dest for a in parser._actions if not isinstance(a, argparse._HelpAction)}
    assert dests <= fields, f"flags that reach no config field: {sorted(dests - fields)}"
