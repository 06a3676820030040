"""Backend options: what a config entry may set under `generators[].options` or `embedder.options`.

Each backend declares its options as a frozen dataclass (its `Options`), one field per option made with
`option()`: the type, the default (the only place it is written), what it does, and whether it decides labels.
The same `parse` checks a config's options when the config loads (pipeline/config.py: a misspelt key or a wrong
type exits 2 before Ray starts) and builds the typed view that the backend's constructor reads, so what the
check accepts is exactly what the backend runs with.

`label=True`: the option can change a rationale's text or a vector, so it is part of the label config and a resume
that changes it is refused. `label=False`: it changes only speed, or how a server is reached; a resume may change
it. The README's option tables are `options_table` of these declarations (tests/test_backend_options.py).
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, ClassVar, Mapping, Optional, TypeVar, Union, get_args, get_origin, get_type_hints

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

OptionsT = TypeVar("OptionsT", bound="BackendOptions")


class OptionError(ValueError):
    """An option a backend does not have, or a value it cannot take; `key` is the option's name."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


def option(default: Any, doc: str, *, label: bool, choices: tuple = (), at_least: Optional[float] = None,
           shown: Optional[str] = None) -> Any:
    """One declared option. `shown`: the default as the README table states it, where the value alone does not
    say it (None meaning "decided on the device", say)."""
    return dataclasses.field(default=default, metadata={
        "doc": doc, "label": label, "choices": tuple(choices), "at_least": at_least, "shown": shown})


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """The base of every backend's options. A backend whose other options go to its runtime as they are (vLLM's
    engine arguments) sets PASSES_ON; those land in `passed_on` and count as label options, since pairsel cannot
    tell which of them change outputs."""

    PASSES_ON: ClassVar[Optional[str]] = None  # where other keys go, in words, or None: other keys are typos
    # another backend's options (of the same role) that this one takes and drops, so that a config switches
    # backends by its `backend` key alone; they change nothing, so they are no label options
    IGNORES: ClassVar[tuple[str, ...]] = ()
    passed_on: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def declared(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if "doc" in f.metadata]

    @classmethod
    def parse(cls: type[OptionsT], options: Optional[Mapping], backend: str = "") -> OptionsT:
        """The typed options, checked (omegaconf converts and checks the types, as for the rest of the config):
        raises OptionError naming the first bad key. `backend` names the backend in messages."""
        given = {k: v for k, v in dict(options or {}).items() if k not in cls.IGNORES}
        names = [f.name for f in cls.declared()]
        rest = {k: v for k, v in given.items() if k not in names}
        if rest and cls.PASSES_ON is None:
            raise _unknown(sorted(rest)[0], names, backend)
        try:
            merged = OmegaConf.merge(OmegaConf.structured(cls), {k: v for k, v in given.items() if k in names})
            typed = OmegaConf.to_object(merged)
        except OmegaConfBaseException as e:
            key = str(getattr(e, "full_key", None) or getattr(e, "key", None) or "options")
            raise OptionError(key, str(getattr(e, "msg", None) or e).splitlines()[0]) from None
        for f in cls.declared():
            value, choices, at_least = getattr(typed, f.name), f.metadata["choices"], f.metadata["at_least"]
            if value is not None and choices and value not in choices:
                raise OptionError(f.name, f"must be one of {', '.join(choices)}; got {value!r}")
            if value is not None and at_least is not None and value < at_least:
                raise OptionError(f.name, f"must be >= {at_least:g}; got {value!r}")
        return dataclasses.replace(typed, passed_on=rest)

    @classmethod
    def label_options(cls, options: Optional[Mapping]) -> dict:
        """The given options that decide labels (the ones a config sets, as it sets them: an option left at its
        default is not there, so a config that sets none hashes as `{}`)."""
        speed = {f.name for f in cls.declared() if not f.metadata["label"]} | set(cls.IGNORES)
        return {k: v for k, v in dict(options or {}).items() if k not in speed}


def _unknown(key: str, names: list[str], backend: str) -> OptionError:
    close = difflib.get_close_matches(key, names, n=1)
    where = f"the {backend}" if backend else "this backend"
    hint = f" (did you mean {close[0]}?)" if close else f" ({where} takes {', '.join(names) or 'none'})"
    return OptionError(key, f"not an option of {where}{hint}")


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Union:
        inner = [a for a in get_args(annotation) if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + " or null"
    origin = get_origin(annotation) or annotation
    return {dict: "mapping", list: "list"}.get(origin, getattr(origin, "__name__", str(origin)))


def _shown(f: dataclasses.Field) -> str:
    """The default as YAML spells it."""
    if f.metadata["shown"] is not None:
        return f.metadata["shown"]
    if f.default is None:
        return "none"
    if isinstance(f.default, bool):
        return f"`{str(f.default).lower()}`"
    return f"`{f.default:g}`" if isinstance(f.default, float) else f"`{f.default}`"


def options_table(cls: type[BackendOptions]) -> str:
    """The README's table of a backend's options, in declaration order."""
    hints = get_type_hints(cls)
    rows = ["| option | type | default | labels | what it does |", "| --- | --- | --- | --- | --- |"]
    for f in cls.declared():
        rows.append(f"| `{f.name}` | {_type_name(hints[f.name])} | {_shown(f)} | "
                    f"{'yes' if f.metadata['label'] else 'no'} | {f.metadata['doc']} |")
    if cls.IGNORES:
        rows.append(f"| {', '.join(f'`{k}`' for k in cls.IGNORES)} | | | no | taken and ignored, so that a "
                    f"config changes backends with `backend` alone |")
    if cls.PASSES_ON:
        rows.append(f"| any other | | | yes | passed to {cls.PASSES_ON} as it is |")
    return "\n".join(rows)
