"""Command-line flags generated from the Config fields, so that every flag maps 1:1 to a field."""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys

from pipeline import config as config_lib


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message):
        # argparse says "argument --batch: invalid int value: 'x'"; keep it to the flag and the reason.
        message = re.sub(r"^argument ", "", message)
        message = message.replace("invalid int value", "expected an integer, got").replace(
            "invalid float value", "expected a number, got"
        )
        self.exit(2, f"error: {message}\n")


def add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (),
                     preset: config_lib.Config | None = None) -> None:
    """Adds one flag per Config field, its help from the field's metadata and its default shown from `preset`.

    Values default to SUPPRESS so that only the flags given are seen.
    """
    preset = preset or config_lib.Config()
    for field in dataclasses.fields(config_lib.Config):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        default = getattr(preset, field.name)
        # argparse expands %-formats in help: a literal % ("95% interval") is written %%.
        help_text = f"{field.metadata.get('help', '')} (default: {default!r})".replace("%", "%%")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=_value_type(type(default), field.metadata.get("names", {}),
                                                       field.metadata.get("words_only", False)),
                                default=argparse.SUPPRESS, metavar=type(default).__name__.upper(), help=help_text)


def _value_type(kind: type, names: dict, words_only: bool = False):
    """kind itself, or a function that also accepts the words in names (e.g. "auto" for -1), for argparse's type.

    With words_only, a number equal to one of the names' values is refused: that value is written as its word.
    """
    if not names:
        return kind

    def value(text: str):
        if text in names:
            return names[text]
        number = kind(text)
        if words_only and number in names.values():
            kind_name = {int: "integer", float: "number"}.get(kind, kind.__name__)
            raise argparse.ArgumentTypeError(f"got {text}; must be a positive {kind_name} or {' | '.join(names)}")
        return number

    value.__name__ = kind.__name__  # argparse's "expected an integer, got 'x'" names the type
    return value


def parse(argv, description: str, extra=None, preset: config_lib.Config | None = None
          ) -> tuple[config_lib.Config, argparse.Namespace]:
    """Parses argv into a validated Config: flags override `--config FILE.json`, which replaces the preset.

    Args:
      argv: arguments without the program name (None: sys.argv[1:]).
      description: the --help text.
      extra: optional function adding entry-point specific flags; they are returned in the namespace
        and not part of the Config. It returns the Config fields that they replace, which get no flag.
      preset: the Config whose values flags and --config replace (default: Config()).
    Returns:
      (config, namespace of all parsed flags).
    Raises:
      InputError: a value is out of range or the config file is bad.
    """
    parser = Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", metavar="FILE.json", help="read the config from this JSON file; flags override it")
    skip = extra(parser) if extra else ()
    preset = preset or config_lib.Config()
    add_config_flags(parser, skip=skip or (), preset=preset)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    base = config_lib.load_json(args.config) if args.config else preset
    fields = {f.name for f in dataclasses.fields(config_lib.Config)}
    overrides = {k: v for k, v in vars(args).items() if k in fields and k not in (skip or ())}
    config = config_lib.from_dict(overrides, base=base, source="flags")
    return config_lib.validate(config), args
