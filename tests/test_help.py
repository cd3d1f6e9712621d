"""``--help``: aurora-train's flags grouped like the docs, every TrainingConfig field in a group,
each default stated once; the aurora-loop sub-commands in the same style."""

from __future__ import annotations

import dataclasses
import re

import pytest

from aurora_loop.cli.tools import SUBCOMMANDS
from aurora_loop.cli.train import build_parser
from aurora_loop.config import FIELD_GROUPS, HELP_GROUPS, TrainingConfig

GROUPS = ["data", "model", "optimisation", "roll-outs", "parallelism and processes", "checkpoints and resuming",
          "logging and callbacks"]


def option_entries(help_text: str, keep_lines: bool = False) -> dict[str, str]:
    """Each option's entry in a --help text: its first flag -> the whole entry (flag column and
    help), its lines joined by spaces (or kept, with ``keep_lines``)."""
    entries, current = {}, None
    for line in help_text.splitlines():
        match = re.match(r"  (-{1,2}[\w-]+)", line)
        if match:
            current = match.group(1)
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += ("\n" if keep_lines else " ") + line.strip()
        else:
            current = None
    return entries


def test_every_field_has_a_group_and_the_groups_follow_the_docs():
    fields = [f.name for f in dataclasses.fields(TrainingConfig)]
    assert [f for f in fields if f not in FIELD_GROUPS] == [], "give each new TrainingConfig field a line in config.FIELD_GROUPS"
    assert sorted(set(FIELD_GROUPS) - set(fields)) == []
    assert list(HELP_GROUPS) == GROUPS and set(FIELD_GROUPS.values()) == set(GROUPS)


def test_the_parser_puts_each_flag_in_its_group():
    parser = build_parser()
    where = {}
    for group in parser._action_groups:
        for action in group._group_actions:
            where[action.dest] = group.title
    assert "other settings" not in where.values()
    for name, group in FIELD_GROUPS.items():
        assert where[name] == f"{group} ({HELP_GROUPS[group]})", name
    titles = [g.title for g in parser._action_groups if g._group_actions]
    assert titles[1:] == [f"{g} ({HELP_GROUPS[g]})" for g in GROUPS]  # after argparse's own "options"


def test_help_states_each_default_once_and_stays_short(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps to the terminal's width
    text = build_parser().format_help()
    entries = option_entries(text)
    assert len(entries) == len(dataclasses.fields(TrainingConfig)) + 6  # -h, --config, --resume, --overwrite, --callback, --print_param_groups
    for flag, entry in entries.items():
        assert entry.count("(default:") <= 1, entry
        if flag[2:] in FIELD_GROUPS:
            assert entry.count("(default:") == 1, entry
    assert text.startswith("usage: aurora-train [--config FILE] [--FLAG VALUE ...]\n")
    assert "(default: none) (default: none)" not in text and "DATASET_PATH" not in text
    assert "--dataset_path PATH" in entries["--dataset_path"] and "--batch_size N" in entries["--batch_size"]
    assert "--remat, --no-remat" in entries["--remat"]
    assert max(entry.count("\n") for entry in option_entries(text, keep_lines=True).values()) < 6  # short helps
    assert len(text.splitlines()) < 300  # 368 lines before the grouping, flags in one flat list


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_subcommand_help_has_the_same_style(command, capsys):
    from aurora_loop.cli.tools import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: aurora-loop {command} ")
    for entry in option_entries(text).values():
        assert len(re.findall(r"\bdefault[:)]", entry)) <= 1, entry  # "(default: x)" at most once
        assert not re.search(r"\(default \w", entry), entry  # "(default: x)", one spelling
