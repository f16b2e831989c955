"""Reading a job file: YAML (repeated keys and non-UTF-8 refused) into a checked
``JobConfig``, every mistake said in one line naming its field."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from study.config.job import JobConfig
from study.config.specs import ConfigError


def _loc(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _one_line(err: ValidationError) -> str:
    e = err.errors()[0]
    msg = e["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if e["type"] == "extra_forbidden":
        msg = "unknown field (a typo?)"
    elif e["type"] == "missing":
        msg = "required field is missing"
    loc = _loc(e["loc"])
    return f"{loc}: {msg}" if loc else msg  # _cross's errors carry their own field path


def parse(raw: dict, source: str = "job", check_paths: bool = True) -> JobConfig:
    """A checked job. ``check_paths=False`` skips the checks that data roots and weights
    files exist (``study plan`` on a laptop, for a job whose data lies on the cluster)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a job file must be a YAML mapping")
    try:
        return JobConfig.model_validate(raw, context={"check_paths": check_paths})
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


def load(path, check_paths: bool = True) -> JobConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"job file not found: {path}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeys)  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text (a job file is YAML)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_error(err)})") from None
    return parse(raw, str(path), check_paths)


def _yaml_error(err: yaml.YAMLError) -> str:
    where = getattr(err, "problem_mark", None)
    what = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{what}, line {where.line + 1}" if where is not None else str(what)


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, except that a key repeated in one mapping is an error: PyYAML
    keeps the last silently, and a second ``eval:`` would drop the first block whole."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} appears twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                    None,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)
