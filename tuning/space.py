"""Search spaces: a YAML file of dotted config paths → the points a sweep trains.

Format (one entry per varied config field; anything not named stays as the run config has it)::

    model.alpha_max: {type: uniform, low: 0.5, high: 2.0}
    model.lr:        {type: loguniform, low: 1.0e-5, high: 1.0e-3}
    model.layers:    {type: choice, values: [[3, 6, 9, 12], [9, 12]]}
    model.neighbourhood_size: {type: randint, low: 3, high: 9}     # high exclusive
    stages:                                                           # several fields together
      type: group
      values:
        - {model.layers: [2, 3], model.widths: [256, 512]}
        - {model.layers: [1, 2, 3], model.widths: [128, 256, 512]}

``uniform``/``loguniform`` need a float field, ``randint`` an integer field; ``choice`` and
``group`` values must each be valid for their field. Grid search (``--search grid``) takes
every ``choice``/``group`` value. Every mistake is rejected before Ray starts, with one line
naming the file and the key.

A *point* of a space is one trial's sampled values: a plain JSON mapping of dimension key to
a number (``uniform``/``loguniform``: a float, ``randint``: an int, ``choice``/``group``: the
index of the value). Sweeps draw their points up front (:meth:`SearchSpace.sample`,
:meth:`SearchSpace.grid`), store them as JSON and check them again on resume
(:meth:`SearchSpace.check_point`); :meth:`SearchSpace.overrides` turns a point into config
overrides.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from agp_data import storage
from agpctl.config import RunConfig, coerce_value, method_config_class
from agpctl.errors import UserError

KINDS = ("uniform", "loguniform", "randint", "choice", "group")
# Where a trial runs and where it writes are the sweep's business, not a hyper-parameter.
FORBIDDEN_PREFIXES = ("method", "storage", "cluster")
SPACES_DIR = os.path.join(os.path.dirname(__file__), "spaces")


class SpaceError(UserError):
    """A search-space file that cannot be used (unknown key, bad range, wrong type)."""


@dataclass
class Dimension:
    key: str  # the dotted config path (for a group: its label)
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    values: list[Any] = field(default_factory=list)  # choice: values; group: {path: value} mappings

    def paths(self) -> list[str]:
        if self.kind == "group":
            return sorted({p for v in self.values for p in v})
        return [self.key]

    def describe(self) -> str:
        if self.kind in ("choice", "group"):
            return f"{self.kind} of {len(self.values)}"
        return f"{self.kind} [{self.low}, {self.high}{')' if self.kind == 'randint' else ']'}"


@dataclass
class SearchSpace:
    method: str
    source: str
    dimensions: list[Dimension]

    def sample(self, rng) -> dict[str, Any]:
        """One random-search point drawn with ``rng`` (a ``numpy.random.Generator``): one
        draw per dimension, in the space's order, so a seed gives the same points."""
        point: dict[str, Any] = {}
        for dim in self.dimensions:
            if dim.kind == "uniform":
                value = float(rng.uniform(dim.low, dim.high))
            elif dim.kind == "loguniform":
                value = math.exp(float(rng.uniform(math.log(dim.low), math.log(dim.high))))
            elif dim.kind == "randint":
                point[dim.key] = int(rng.integers(dim.low, dim.high))
                continue
            else:
                point[dim.key] = int(rng.integers(len(dim.values)))
                continue
            point[dim.key] = min(max(value, float(dim.low)), float(dim.high))  # exp(log(x)) may round past x
        return point

    def grid(self) -> list[dict[str, int]]:
        """Every grid-search point (choice / group indices), the first dimension slowest."""
        for dim in self.dimensions:
            if dim.kind not in ("choice", "group"):
                raise SpaceError(f"{self.source}: {dim.key}: grid search needs choice values, not {dim.kind}; "
                                 "use --search random or list the values with type: choice")
        keys = [dim.key for dim in self.dimensions]
        return [dict(zip(keys, combo)) for combo in itertools.product(*(range(len(d.values)) for d in self.dimensions))]

    def check_point(self, point: Any, where: str) -> None:
        """SpaceError unless ``point`` is one this space can give (a stored sweep's trial)."""
        if not isinstance(point, dict):
            raise SpaceError(f"{where}: expected a mapping of dimension keys to values, got {type(point).__name__}")
        keys = [dim.key for dim in self.dimensions]
        if sorted(point) != sorted(keys):
            raise SpaceError(f"{where}: dimensions {sorted(point)} do not match the space's {sorted(keys)}")
        for dim in self.dimensions:
            value = point[dim.key]
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if dim.kind in ("choice", "group", "randint"):
                low, high = (0, len(dim.values)) if dim.kind != "randint" else (dim.low, dim.high)
                if not isinstance(value, int) or isinstance(value, bool) or not low <= value < high:
                    raise SpaceError(f"{where}: {dim.key}: {value!r} is not an integer in [{low}, {high})")
            elif not number or not math.isfinite(value) or not dim.low <= value <= dim.high:
                raise SpaceError(f"{where}: {dim.key}: {value!r} is not a number in [{dim.low}, {dim.high}]")

    def overrides(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """Dotted-path overrides of one trial from the values Tune sampled."""
        out: dict[str, Any] = {}
        for dim in self.dimensions:
            value = sampled[dim.key]
            if dim.kind in ("choice", "group"):
                value = dim.values[int(value)]
            if dim.kind == "group":
                out.update(value)
            else:
                out[dim.key] = value
        return out

    def grid_size(self) -> int:
        size = 1
        for dim in self.dimensions:
            size *= len(dim.values) if dim.kind in ("choice", "group") else 1
        return size

    def to_raw(self) -> dict[str, Any]:
        """The space as plain JSON in the file format ``parse_space`` reads (sweep.json and
        results.json keep it; a trial parses it again)."""
        raw: dict[str, Any] = {}
        for dim in self.dimensions:
            if dim.kind in ("choice", "group"):
                raw[dim.key] = {"type": dim.kind, "values": dim.values}
            else:
                raw[dim.key] = {"type": dim.kind, "low": dim.low, "high": dim.high}
        return json.loads(json.dumps(raw, default=str))  # plain JSON types (dict keys become text)


def default_space_path(method: str) -> str:
    return os.path.join(SPACES_DIR, f"{method}.yaml")


def load_space(method: str, path: str | None = None) -> SearchSpace:
    """The space in ``path`` (local or s3://), or the method's default space."""
    source = path or default_space_path(method)
    if path and not storage.exists(path):
        raise SpaceError(f"search space file {path} not found")
    if not path and not os.path.exists(source):
        raise SpaceError(f"no default search space for method {method!r}; pass --space FILE.yaml")
    text = storage.read_text(source) if path else open(source, encoding="utf-8").read()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpaceError(f"{source}: not valid YAML ({exc.__class__.__name__}); fix the syntax") from None
    return parse_space(raw, method, source)


def parse_space(raw: Any, method: str, source: str = "space") -> SearchSpace:
    method_config_class(method)  # unknown method: one clear line
    if not isinstance(raw, dict) or not raw:
        raise SpaceError(f"{source}: expected a mapping of config paths to {{type: ..., ...}} entries")
    base = RunConfig(method=method)
    dims = [_parse_dimension(str(key), spec, method, base, source) for key, spec in raw.items()]
    seen: dict[str, str] = {}
    for dim in dims:
        for p in dim.paths():
            if p in seen:
                raise SpaceError(f"{source}: {dim.key}: {p} is already varied by {seen[p]}")
            seen[p] = dim.key
    return SearchSpace(method=method, source=source, dimensions=dims)


def _parse_dimension(key: str, spec: Any, method: str, base: RunConfig, source: str) -> Dimension:
    where = f"{source}: {key}"
    if not isinstance(spec, dict) or "type" not in spec:
        raise SpaceError(f"{where}: expected {{type: {'|'.join(KINDS)}, ...}}, got {spec!r}")
    kind = spec["type"]
    if kind not in KINDS:
        raise SpaceError(f"{where}: unknown type {kind!r}; use one of {', '.join(KINDS)}")
    allowed = {"type", "values"} if kind in ("choice", "group") else {"type", "low", "high"}
    extra = sorted(set(spec) - allowed)
    if extra:
        raise SpaceError(f"{where}: unexpected field(s) {', '.join(extra)} for type {kind}; expected {', '.join(sorted(allowed))}")

    if kind == "group":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise SpaceError(f"{where}: group needs a non-empty list of values ({{path: value, ...}} mappings)")
        coerced = []
        for option in values:
            if not isinstance(option, dict) or not option:
                raise SpaceError(f"{where}: each group value must be a mapping of config paths to values, got {option!r}")
            coerced.append({str(p): _coerce_value(str(p), v, method, f"{where}: {p}") for p, v in option.items()})
            _check_builds(base, coerced[-1], where)
        return Dimension(key=key, kind=kind, values=coerced)

    hint = field_hint(key, method, where)
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise SpaceError(f"{where}: choice needs a non-empty list of values")
        coerced = [_coerce_value(key, v, method, where) for v in values]
        for v in coerced:
            _check_builds(base, {key: v}, where)
        return Dimension(key=key, kind=kind, values=coerced)

    if "low" not in spec or "high" not in spec:
        raise SpaceError(f"{where}: {kind} needs both low and high")
    low, high = spec["low"], spec["high"]
    scalar = _scalar_type(hint)
    if kind == "randint":
        if scalar is not int:
            raise SpaceError(f"{where}: randint needs an integer field; {key} is {_type_name(hint)}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)):
            raise SpaceError(f"{where}: randint low and high must be integers, got {low!r}, {high!r}")
    else:
        if scalar is not float:
            hint_text = " (use randint)" if scalar is int else " (use choice)"
            raise SpaceError(f"{where}: {kind} needs a float field; {key} is {_type_name(hint)}{hint_text}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            raise SpaceError(f"{where}: {kind} low and high must be numbers, got {low!r}, {high!r}")
        low, high = float(low), float(high)
    if low >= high:
        raise SpaceError(f"{where}: low ({low}) must be below high ({high})")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(f"{where}: loguniform needs low > 0, got {low}")
    last = high - 1 if kind == "randint" else high
    for v in (low, last):
        _check_builds(base, {key: v}, where)
    return Dimension(key=key, kind=kind, low=low, high=high)


def field_hint(path: str, method: str, where: str) -> Any:
    """Type hint of the config field at a dotted path; SpaceError if there is none."""
    parts = path.split(".")
    if not path or any(not p for p in parts):
        raise SpaceError(f"{where}: not a dotted config path")
    if parts[0] in FORBIDDEN_PREFIXES:
        raise SpaceError(f"{where}: {parts[0]} cannot be searched (it is fixed for the whole sweep); "
                         "vary model.* / train.* / data.* fields")
    cls: Any = RunConfig
    hint: Any = None
    for i, name in enumerate(parts):
        if cls is RunConfig and name == "model":
            hint = method_config_class(method)
        else:
            hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
            if name not in hints:
                known = ", ".join(sorted(hints)) if hints else "none"
                prefix = ".".join(parts[:i]) or "the run config"
                raise SpaceError(f"{where}: unknown config field {name!r} in {prefix} for method {method}; known: {known}")
            hint = hints[name]
        if i < len(parts) - 1:
            inner = _unwrap_optional(hint)
            if not dataclasses.is_dataclass(inner):
                raise SpaceError(f"{where}: {'.'.join(parts[: i + 1])} is not a section with fields")
            cls = inner
    if dataclasses.is_dataclass(_unwrap_optional(hint)):
        raise SpaceError(f"{where}: {path} is a whole section; name one of its fields")
    return hint


def _coerce_value(path: str, value: Any, method: str, where: str) -> Any:
    hint = field_hint(path, method, where)
    scalar = _scalar_type(hint)
    if scalar in (int, float) and (isinstance(value, bool) or isinstance(value, str)):
        raise SpaceError(f"{where}: {value!r} is not a {scalar.__name__} ({path} is {_type_name(hint)})")
    try:
        return coerce_value(hint, value, where)
    except UserError as exc:
        raise SpaceError(str(exc)) from None


def _check_builds(base: RunConfig, overrides: dict[str, Any], where: str) -> None:
    """The method's own checks (allowed names, divisibility) on one value, before Ray starts."""
    try:
        base.with_overrides(overrides)
    except (UserError, ValueError, TypeError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise SpaceError(f"{where}: {overrides} rejected: {text}") from None


def _unwrap_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _scalar_type(hint: Any) -> Any:
    inner = _unwrap_optional(hint)
    return inner if inner in (int, float, bool, str) else None


def _type_name(hint: Any) -> str:
    inner = _unwrap_optional(hint)
    return getattr(inner, "__name__", None) or str(inner).replace("typing.", "")
