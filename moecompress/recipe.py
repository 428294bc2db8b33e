"""Recipes: a YAML file listing stages in order, validated in full (unknown keys are errors) before any
model is loaded.

Example::

    name: demo-drop-two
    model: null                    # null = the bundled demo model; or a local HF directory, or tiny:<type>
    calibration: {tasks: [prose, code], samples: 32, seq_len: 256, seed: 0}
    stages:
      - stage: keep_experts
        drop: {all: [6, 7]}
    output: out/demo-drop-two
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moecompress.errors import MoecompressError
from moecompress.stages import STAGES, StageConfig

__all__ = ["CalibrationConfig", "Recipe", "load_recipe", "one_line", "validate_command", "validate_recipe"]


class CalibrationConfig(BaseModel):
    """Text the stages calibrate on: bundled tasks by name and/or the user's files per task."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    tasks: list[str] | None = None  # None = every bundled task (or only the --data tasks when given)
    data: dict[str, str] = Field(default_factory=dict)  # task -> .jsonl / .txt path
    samples: int = Field(64, ge=1)  # windows per task
    seq_len: int = Field(256, ge=2)
    seed: int = 0


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str | None = None
    model: str | None = None
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    stages: list[StageConfig] = Field(min_length=1)
    output: str | None = None
    device: str = "auto"  # auto (the first GPU when there is one) | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # compute dtype (auto: fp32 on CPU, stored on GPU)
    offload_hidden: bool = False  # keep the batches' hidden states in host memory between layers

    @field_validator("stages", mode="before")
    @classmethod
    def _stages(cls, value: Any) -> list[StageConfig]:
        if not isinstance(value, list):
            raise ValueError("'stages' must be a list of '- stage: NAME' entries")
        out = []
        for i, item in enumerate(value):
            if isinstance(item, StageConfig):
                out.append(item)
                continue
            if not isinstance(item, dict) or "stage" not in item:
                raise ValueError(f"stages[{i}] needs a 'stage: NAME' key")
            if item["stage"] not in STAGES:
                raise ValueError(f"stages[{i}]: unknown stage {item['stage']!r} (known: {', '.join(STAGES.names())})")
            try:
                out.append(STAGES.get(item["stage"]).config.model_validate(item))
            except ValidationError as e:
                raise ValueError(f"stages[{i}] ({item['stage']}): {one_line(e)}") from None
        return out


def one_line(err: ValidationError) -> str:
    """The first validation problem (unknown keys first: they explain the rest) as one readable line."""
    errors = err.errors()
    e = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
    where = ".".join(str(p) for p in e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        return f"unknown key {where!r}"
    if msg.startswith("stages["):  # already located by the stages validator
        return msg
    return f"{where}: {msg}" if where else msg


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; any problem is a one-line `MoecompressError`."""
    path = Path(path)
    if not path.is_file():
        raise MoecompressError(f"recipe {str(path)!r} does not exist", "check the path (recipes/ has examples)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise MoecompressError(f"recipe {str(path)!r} is not valid YAML{where}", "fix the syntax") from None
    if not isinstance(data, dict):
        raise MoecompressError(f"recipe {str(path)!r} is not a mapping", "write 'stages:' and friends at top level")
    return validate_recipe(data, str(path))


def validate_recipe(data: dict[str, Any], label: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise MoecompressError(f"{label}: {one_line(e)}", _hint(e)) from None


def _hint(err: ValidationError) -> str:
    text = one_line(err)
    if "unknown key" in text:
        if text.startswith("stages["):
            return "remove or rename it (`moecompress list` shows every stage's keys)"
        return f"top-level keys are: {', '.join(Recipe.model_fields)}"
    if "unknown stage" in text:
        return "use a registered stage (`moecompress list`)"
    return "see the example recipes in recipes/"


def _flag(key: str, flags: dict[str, str]) -> str:
    return flags.get(key, "--" + key.replace("_", "-"))


def _flag_error(err: ValidationError, data: dict[str, Any], flags: dict[str, str], command: str) -> MoecompressError:
    """A validation error of a command's options, in the command's own terms (its flags, not recipe keys)."""
    errors = err.errors()
    e = errors[0]
    msg = e["msg"].removeprefix("Value error, ")
    msg = msg[0].lower() + msg[1:] if msg else msg
    fix = f"see `moecompress {command} --help`"
    if e["loc"]:
        key = str(e["loc"][0])
        value = data.get(key)
        shown = f" {value}" if value is not None and not isinstance(value, (dict, list)) else ""
        return MoecompressError(f"{_flag(key, flags)}{shown}: {msg}", fix)
    keys = sorted(data, key=len, reverse=True)  # a rule across options names them as flags
    if keys:
        msg = re.sub(r"(?<![\w-])(" + "|".join(map(re.escape, keys)) + r")(?![\w-])",
                     lambda m: _flag(m.group(1), flags), msg)
    return MoecompressError(msg, fix)


def validate_command(command: str, model: str | None, calibration: dict[str, Any], stage: dict[str, Any],
                     flags: dict[str, str] | None = None, run: dict[str, Any] | None = None) -> Recipe:
    """The one-stage recipe of a CLI command; a bad option value is reported by its flag (``--scheme``).
    ``run``: the recipe's run settings (device, dtype, offload_hidden)."""
    flags = dict(flags or {})
    run = {k: v for k, v in (run or {}).items() if v is not None}
    try:
        CalibrationConfig.model_validate(calibration)
    except ValidationError as e:
        raise _flag_error(e, calibration, flags, command) from None
    try:
        STAGES.get(stage["stage"]).config.model_validate(stage)
    except ValidationError as e:
        raise _flag_error(e, stage, flags, command) from None
    try:
        Recipe.model_validate({"stages": [stage], **run})
    except ValidationError as e:
        raise _flag_error(e, run, flags, command) from None
    return validate_recipe({"model": model, "calibration": calibration, "stages": [stage], **run}, command)
