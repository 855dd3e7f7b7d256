"""Cell validation: the converters of the setting columns (model, temperature, seed, ...), their limits, the job
defaults checked the same way, and carried-through columns made JSON-safe. A converter takes a raw cell (a str
from CSV; any Python value from Parquet) that is not empty, and returns its value or raises BadCell with what is
wrong."""

from __future__ import annotations

import base64
import datetime as _dt
import decimal
import math
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from batcher import catalog
from batcher.errors import ManifestError

from .types import ManifestOptions


#: Longest prompt accepted, in characters. The image models take 32k-64k input tokens; 100,000 characters is
#: roughly 25k tokens of English, so a longer prompt is almost certainly a broken cell (an unclosed quote).
MAX_PROMPT_CHARS = 100_000
#: Most images asked for one row.
MAX_VARIANTS = 100
SEED_MIN, SEED_MAX = -(2**31), 2**31 - 1  # GenerationConfig.seed is an int32
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_P_RANGE = (0.0, 1.0)


class BadCell(Exception):
    pass


def shown_cell(raw: Any) -> str:
    return raw if isinstance(raw, str) else str(raw)


def is_empty(raw: Any) -> bool:
    return raw is None or (isinstance(raw, str) and not raw.strip())


def _to_float(raw: Any, name: str, lo: float, hi: float) -> float:
    if isinstance(raw, bool):
        raise BadCell(f"{name} must be a number from {lo:g} to {hi:g}")
    try:
        value = float(raw.strip() if isinstance(raw, str) else raw)
    except (TypeError, ValueError):
        raise BadCell(f"{name} must be a number from {lo:g} to {hi:g}") from None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise BadCell(f"{name} must be a number from {lo:g} to {hi:g}")
    return value


def _to_int(raw: Any) -> int | None:
    """An integer from 42, 42.0, "42", "42.0"; None if the value is not a whole number."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str):
        text = raw.strip()
        try:
            return int(text)
        except ValueError:
            try:
                raw = float(text)
            except ValueError:
                return None
    if isinstance(raw, (float, decimal.Decimal)):
        try:
            return int(raw) if math.isfinite(raw) and raw == int(raw) else None
        except (ValueError, OverflowError):
            return None
    return None


def _conv_temperature(raw: Any) -> float:
    return _to_float(raw, "temperature", *TEMPERATURE_RANGE)


def _conv_top_p(raw: Any) -> float:
    return _to_float(raw, "top_p", *TOP_P_RANGE)


def _conv_seed(raw: Any) -> int:
    value = _to_int(raw)
    if value is None:
        raise BadCell("seed must be a whole number (e.g. 42)")
    if not SEED_MIN <= value <= SEED_MAX:
        raise BadCell(f"seed must be a 32-bit integer, from {SEED_MIN} to {SEED_MAX}")
    return value


def _conv_variants(raw: Any) -> int:
    value = _to_int(raw)
    if value is None or not 1 <= value <= MAX_VARIANTS:
        raise BadCell(f"variants must be a whole number from 1 to {MAX_VARIANTS}")
    return value


def convert_model(raw: Any) -> str:
    """A model name as the API takes it ("models/" dropped). A model the catalog does not know is accepted here
    (the API is asked about it before anything is sent); one that is shut down is refused, naming its successor."""
    if not isinstance(raw, str):
        raise BadCell("model must be text")
    name = raw.strip().removeprefix("models/")
    problem = catalog.model_name_problem(name) or catalog.refusal(name)
    if problem:
        raise BadCell(problem)
    return name


def _conv_text(name: str) -> Callable[[Any], str]:
    def conv(raw: Any) -> str:
        if not isinstance(raw, str):
            raise BadCell(f"{name} must be text")
        return raw.strip()

    return conv


def _conv_system_instruction(raw: Any) -> str:
    if not isinstance(raw, str):
        raise BadCell("system_instruction must be text")
    return raw  # kept as written (only an all-whitespace cell counts as empty)


CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "model": convert_model,
    "aspect_ratio": _conv_text("aspect_ratio"),
    "image_size": _conv_text("image_size"),
    "temperature": _conv_temperature,
    "top_p": _conv_top_p,
    "seed": _conv_seed,
    "variants": _conv_variants,
    "system_instruction": _conv_system_instruction,
}


def aspect_ratio_problem(spec: catalog.ModelSpec, value: str) -> str | None:
    if value in spec.aspect_ratios:
        return None
    return f"not a valid aspect ratio for {spec.name}; use one of {', '.join(spec.aspect_ratios)}"


def image_size_problem(spec: catalog.ModelSpec, value: str) -> str | None:
    if value in spec.image_sizes:
        return None
    message = f"not a valid image size for {spec.name}; use one of {', '.join(spec.image_sizes)}"
    if value.upper() in spec.image_sizes:
        message += f" (sizes are case-sensitive: did you mean {value.upper()!r}?)"
    return message


def jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value)


def plain_type(t: pa.DataType) -> bool:
    """True when to_pylist() of this type gives JSON-serialisable values as they are."""
    if pa.types.is_dictionary(t):
        return plain_type(t.value_type)
    if (
        pa.types.is_list(t)
        or pa.types.is_large_list(t)
        or pa.types.is_fixed_size_list(t)
        or getattr(pa.types, "is_list_view", lambda _t: False)(t)
    ):
        return plain_type(t.value_type)
    if pa.types.is_struct(t):
        return all(plain_type(t.field(i).type) for i in range(t.num_fields))
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or getattr(pa.types, "is_string_view", lambda _t: False)(t)
        or pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_boolean(t)
        or pa.types.is_null(t)
    )


def round_trips(t: pa.DataType) -> bool:
    """True when a carried-through column of this type comes out of the ledger's JSON as it went in (jsonable, then
    from_jsonable): it keeps its Arrow type in the dataset. Other types (intervals, extension types) become text."""
    if plain_type(t) or any(check(t) for check in (pa.types.is_timestamp, pa.types.is_date, pa.types.is_time,
                                                    pa.types.is_decimal, pa.types.is_binary, pa.types.is_large_binary,
                                                    pa.types.is_fixed_size_binary, pa.types.is_duration)):
        return True
    if pa.types.is_dictionary(t):
        return round_trips(t.value_type)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return round_trips(t.value_type)
    if pa.types.is_struct(t):
        return all(round_trips(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_map(t):
        return round_trips(t.key_type) and round_trips(t.item_type)
    return False


def from_jsonable(value: Any, t: pa.DataType) -> Any:
    """The inverse of jsonable for a value of type `t` (see round_trips): what pa.array(..., type=t) takes."""
    if value is None:
        return None
    if pa.types.is_dictionary(t):
        return from_jsonable(value, t.value_type)
    if pa.types.is_timestamp(t):
        return _dt.datetime.fromisoformat(value)
    if pa.types.is_date(t):
        return _dt.date.fromisoformat(value)
    if pa.types.is_time(t):
        return _dt.time.fromisoformat(value)
    if pa.types.is_decimal(t):
        return decimal.Decimal(value)
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return base64.b64decode(value)
    if pa.types.is_duration(t):
        return _dt.timedelta(seconds=value)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return [from_jsonable(v, t.value_type) for v in value]
    if pa.types.is_struct(t):
        return {f.name: from_jsonable(value.get(f.name), f.type) for f in t}
    if pa.types.is_map(t):
        return [(from_jsonable(k, t.key_type), from_jsonable(v, t.item_type)) for k, v in value]
    return value


def column_values(array: pa.Array | pa.ChunkedArray, plain: bool) -> list:
    values = array.to_pylist()
    return values if plain else [jsonable(v) for v in values]


def check_options(options: ManifestOptions) -> str:
    """Check the job defaults; returns the default model's name (the catalog may not know it)."""
    try:
        default_model = convert_model(options.model or "")
    except BadCell as bad:
        raise ManifestError(f"Invalid default model {options.model!r} (--model): {bad}.") from None
    checks: list[tuple[str, Callable[[Any], Any], Any]] = [
        ("temperature", _conv_temperature, options.temperature),
        ("top_p", _conv_top_p, options.top_p),
        ("seed", _conv_seed, options.seed),
        ("variants", _conv_variants, options.variants),
    ]
    for name, conv, value in checks:
        if value is None:
            continue
        try:
            conv(value)
        except BadCell as bad:
            raise ManifestError(f"Invalid default --{name.replace('_', '-')} {value!r}: {bad}.") from None
    return default_model
