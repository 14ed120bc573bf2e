"""Loading params.yaml: parse, validate against `pipeline.settings`, explain errors.

`load_params` turns pydantic's errors into one line per problem naming the key
(`teacher.bridge.train.lr`), what is wrong and the value given. It imports
only pydantic and PyYAML, so it answers in a fraction of a second, before
torch, Ray or any data are touched.
"""
from pathlib import Path

import yaml
from pydantic import ValidationError

from pipeline.settings import PipelineParams


class ConfigError(ValueError):
    """params.yaml is missing, unparsable or invalid; the message names each bad key."""


def format_errors(err: ValidationError, source):
    lines = []
    for e in err.errors():
        # Drop pydantic's union-branch markers so the key reads as in params.yaml.
        key = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "tagged-")))
        given = e.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"{source}: {key or '<top level>'}: {e['msg']}{shown}")
    return "\n".join(lines)


def parse_params(raw, source="params.yaml"):
    """Validate an already-parsed dict; raise ConfigError listing every bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    try:
        return PipelineParams.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_errors(err, source)) from None


def load_params(path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    return parse_params(raw, source=str(path))
