"""One options model for every lab run.

A frozen dataclass per concern (:class:`ClusterOptions`, :class:`LoadOptions`,
:class:`FaultOptions`, :class:`P2POptions`, :class:`QemuOptions`,
:class:`OutputOptions`) holds each option once: its type, default, help and
allowed values (field metadata, see :func:`option`).  Everything else is
derived from it:

* invoke tasks: :func:`task` makes a task whose flags, defaults and help come
  from the groups it names, with a provider's :data:`PRESETS` applied (QEMU
  guests get fewer clients and slower failure detection than local
  processes); the help always shows the default that applies;
* JSON: :func:`to_json` and :func:`from_json` carry a whole set of options to
  another process (the nightly, the load generator) without rebuilding argv;
  every generated task takes ``--options FILE.json``;
* :func:`schema` lists every option for a program that asks which ones a
  checkout knows (``python -m plexilab.options``), instead of scraping
  ``invoke --help``.

Option names are unique across groups, so every task has flat flags
(``--clients``, ``--fault-interval``) whatever group they belong to.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import Task

T = TypeVar("T")


class OptionError(ValueError):
    """An option value outside what its field allows."""


def option(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] = (),
    cli_choices: Sequence[Any] = (),
) -> Any:
    """A dataclass field with its *help* and allowed *choices* as metadata.

    *cli_choices* narrows what a command-line flag may set (code may still
    set the rest: the security benchmark's ``insecure`` baseline).
    """
    meta = {"help": help, "choices": tuple(choices), "cli_choices": tuple(cli_choices)}
    return field(default=default, metadata=meta)


def _check(instance: object) -> None:
    """Every field's allowed values, then every group's :meth:`validate`."""
    for f in dataclasses.fields(instance):  # type: ignore[arg-type]
        value = getattr(instance, f.name)
        choices = f.metadata.get("choices", ())
        if choices and value not in choices:
            shown = ", ".join(repr(c) for c in choices)
            raise OptionError(f"--{flag(f.name)} must be one of {shown}, not {value!r}")
    _validate_all(instance)


class _Group:
    """Base of the option groups: each checks its own fields, then hands on
    (a class that inherits several groups runs every group's check)."""

    def __post_init__(self) -> None:
        _check(self)

    def validate(self) -> None:
        """Checks beyond the allowed values (overridden per group)."""


def _validate_all(instance: object) -> None:
    for klass in type(instance).__mro__:
        check = klass.__dict__.get("validate")
        if check is not None:
            check(instance)


@dataclass
class ClusterOptions(_Group):
    """The nodes: how many, how they replicate, detect failures and run."""

    nodes: int = option(3, "number of nodes (inventory: 0 runs one per host)")
    replicas: int = option(2, "copies of each message before it is acknowledged")
    backend: str = option(
        "",
        "auto (compiled when available) or python (reference backends); empty: "
        "what PLEXICHAT_BACKEND and PLEXICHAT_BACKEND_<FAMILY> ask for",
        choices=("", "auto", "python"),
    )
    security: str = option(
        "auth",
        "auth: a per-run cluster secret, peer handshakes and client tokens; "
        "tls: that, and the load speaks TLS to the nodes",
        choices=("auth", "tls", "insecure"),
        cli_choices=("auth", "tls"),
    )
    install: Literal["dev", "wheel"] = option(
        "dev",
        "dev: run from src/ (in-place builds); wheel: build the wheel once into "
        "a cached venv under .cache/",
        choices=("dev", "wheel"),
    )
    gossip_interval: float = option(0.2, "seconds between membership gossip rounds")
    ping_timeout: float = option(
        0.3, "failure detector: seconds a node waits for a PONG"
    )
    suspect_timeout: float = option(
        1.0,
        "failure detector: seconds a suspected node has to refute before the "
        "others route around it",
    )

    def validate(self) -> None:
        if self.nodes < 0 or self.replicas < 1:
            raise OptionError("--nodes must be 0 or more, --replicas at least 1")


@dataclass
class LoadOptions(_Group):
    """The chat load of a run (plexichat-load)."""

    duration: float = option(30.0, "seconds of chat load")
    clients: int = option(8, "concurrent load clients")
    inflight: int = option(64, "requests in flight per client, closed loop")
    connections: int = option(
        1,
        "connections per node shared by the load clients; 0 gives every client its own",
    )
    payload: int = option(64, "message payload bytes")
    channels: int = option(256, "number of channels")
    mode: str = option(
        "closed",
        "closed: every client keeps --inflight requests; open: --rate msg/s",
        choices=("closed", "open"),
    )
    rate: float = option(20_000.0, "messages per second of the open loop")
    count: int = option(50_000_000, "stop the load after this many messages")
    distribution: str = option(
        "uniform", "channel popularity", choices=("uniform", "zipf")
    )
    route: str = option(
        "owner",
        "owner: send to the channel's owner; any: one node per client (it forwards)",
        choices=("owner", "any"),
    )
    load: str = option(
        "binary",
        "the load engine: binary (plexichat-load over the binary protocol) or "
        "locust (Locust users over the nodes' HTTP API; local hosts)",
        choices=("binary", "locust"),
    )
    users: int = option(20, "concurrent Locust users, --load=locust")
    spawn_rate: float = option(10.0, "Locust users started per second, --load=locust")
    request_timeout: float = option(
        0.0,
        "seconds before the load gives a request up and sends its channel "
        "through another node (0: 10 s, or with faults twice the suspicion "
        "timeout within 2..10 s)",
    )

    def validate(self) -> None:
        if self.duration <= 0:
            raise OptionError("--duration must be positive")
        if min(self.clients, self.inflight, self.payload, self.channels) < 1:
            raise OptionError(
                "--clients, --inflight, --payload and --channels must be positive"
            )
        if self.connections < 0:
            raise OptionError("--connections must be 0 or more")
        if self.users < 1 or self.spawn_rate <= 0:
            raise OptionError("--users and --spawn-rate must be positive")


@dataclass
class FaultOptions(_Group):
    """Faults injected during the load (plexilab.run.faults)."""

    faults: str | list[str] = option(  # noqa: RUF009 - option() is a field()
        "none",
        "comma list of faults to inject during the load (partition, kill, pause, "
        "poweroff, split: what the provider supports), default (all of those) "
        "or none",
    )
    fault_interval: float = option(10.0, "seconds between fault starts")
    fault_duration: float = option(
        0.0, "seconds each fault lasts (0: half the interval)"
    )

    def __post_init__(self) -> None:
        self.faults = self.kinds  # a comma list (a flag) becomes names
        super().__post_init__()

    def validate(self) -> None:
        if self.fault_interval <= 0:
            raise OptionError("--fault-interval must be positive")
        if not 0 <= self.fault_duration < self.fault_interval:
            raise OptionError("--fault-duration must be shorter than --fault-interval")

    @property
    def kinds(self) -> list[str]:
        """The faults as names (``none`` and empty are no faults)."""
        items = self.faults.split(",") if isinstance(self.faults, str) else self.faults
        names = [s.strip().lower() for s in items if s.strip()]
        return [] if names == ["none"] else names


@dataclass
class P2POptions(_Group):
    """The P2P relay scenario."""

    p2p_count: int = option(200, "relay messages of the P2P scenario")
    p2p_rate: float = option(200.0, "relay messages per second")
    p2p_fanout: int = option(2, "next hops per node of a relay")


@dataclass
class QemuOptions(_Group):
    """QEMU guests (qemu.cluster, qemu.p2p)."""

    arch: str = option(
        "mixed",
        "guest architecture: mixed (x86_64, aarch64, aarch64, ...), x86_64 or aarch64",
        choices=("mixed", "x86_64", "aarch64"),
    )
    fallback: str = option(
        "local",
        "local: run on local processes when QEMU cannot run here (the result "
        "says so); none: fail instead",
        choices=("local", "none"),
    )
    runtime: str = option(
        "process",
        "process: nodes run from the pushed wheel; docker: containers of the lab "
        "host's PlexiChat image in the guests' engines",
        choices=("process", "docker"),
    )
    port_base: int = option(7100, "first node port inside the guests")
    boot_timeout: float = option(180.0, "seconds a guest may take to boot to SSH")
    memory_mib: int = option(0, "guest memory (0: the arch profile's)")
    clock_sync: bool = option(True, "set the guests' clocks from the host's")


@dataclass
class OutputOptions(_Group):
    """Where a run writes what it found."""

    json: str = option("", "write the results as JSON to this path")
    results: str = option(
        "", "directory for journal, load/p2p/check JSON and node logs"
    )


GROUPS: tuple[type, ...] = (
    ClusterOptions,
    LoadOptions,
    FaultOptions,
    P2POptions,
    QemuOptions,
    OutputOptions,
)

# A provider's defaults where they differ from the fields' (TCG guests run
# about 13x slower than the host: fewer clients, a smaller window, membership
# timeouts a busy emulated CPU does not trip).
PRESETS: dict[str, dict[str, Any]] = {
    "local": {"install": "wheel"},
    "docker": {},
    "qemu": {
        "install": "wheel",
        "clients": 4,
        "inflight": 32,
        "p2p_rate": 100.0,
        "ping_timeout": 2.0,
        "suspect_timeout": 10.0,
        "fault_interval": 20.0,
    },
    # real networks: no false suspicion on a slow hop
    "inventory": {
        "install": "wheel",
        "nodes": 0,
        "ping_timeout": 1.0,
        "suspect_timeout": 5.0,
        "fault_interval": 20.0,
    },
}


def preset(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator, under ``@dataclass``: the inherited option fields that
    :data:`PRESETS` [*name*] names get that preset's defaults (their help and
    allowed values stay those of the group that declares them)."""

    def apply(cls: type[T]) -> type[T]:
        inherited = {
            f.name: f
            for base in reversed(cls.__mro__[1:])
            if dataclasses.is_dataclass(base)
            for f in dataclasses.fields(base)
        }
        annotations = dict(inspect.get_annotations(cls))
        for key, value in PRESETS[name].items():
            if key in inherited:
                annotations[key] = inherited[key].type
                setattr(
                    cls, key, field(default=value, metadata=inherited[key].metadata)
                )
        cls.__annotations__ = annotations
        return cls

    return apply


def values_of(instance: object, *groups: type) -> dict[str, Any]:
    """The options of *groups* that *instance* has, by name."""
    names = {f.name for group in groups for f in dataclasses.fields(group)}
    return {n: getattr(instance, n) for n in names if hasattr(instance, n)}


def flat(chosen: Chosen, *groups: type) -> dict[str, Any]:
    """The options of those of *groups* that *chosen* has, as one ``{name:
    value}``."""
    out: dict[str, Any] = {}
    for group in groups:
        if group in chosen.groups:
            out.update(dataclasses.asdict(chosen[group]))
    return out


def flag(name: str) -> str:
    """The command-line flag of option *name* (without the dashes)."""
    return name.replace("_", "-")


def _fields(groups: Sequence[type]) -> list[tuple[type, dataclasses.Field[Any]]]:
    out: list[tuple[type, dataclasses.Field[Any]]] = []
    seen: dict[str, type] = {}
    for group in groups:
        for f in dataclasses.fields(group):
            if f.name in seen:
                raise TypeError(
                    f"option {f.name!r} of {group.__name__} is also in "
                    f"{seen[f.name].__name__}"
                )
            seen[f.name] = group
            out.append((group, f))
    return out


def preset_defaults(groups: Sequence[type], preset: str = "local") -> dict[str, Any]:
    """``{option: default}`` of *groups* with *preset*'s overrides."""
    values = {f.name: f.default for _group, f in _fields(groups)}
    overrides = PRESETS[preset]
    return {**values, **{k: v for k, v in overrides.items() if k in values}}


def build(
    groups: Sequence[type],
    values: Mapping[str, Any] | None = None,
    *,
    preset: str = "local",
) -> dict[type, Any]:
    """One instance per group from *preset*'s defaults updated by *values*.

    Unknown names in *values* raise :class:`OptionError` listing the known
    ones.
    """
    merged = preset_defaults(groups, preset)
    given = dict(values or {})
    unknown = sorted(set(given) - set(merged))
    if unknown:
        raise OptionError(
            f"unknown option(s) {', '.join(unknown)}; known: {', '.join(merged)}"
        )
    merged.update(given)
    return {
        group: group(**{f.name: merged[f.name] for f in dataclasses.fields(group)})
        for group in groups
    }


def to_json(*instances: object) -> str:
    """The options of *instances* as one flat JSON object."""
    flat: dict[str, Any] = {}
    for instance in instances:
        flat.update(dataclasses.asdict(instance))  # type: ignore[call-overload]
    return json.dumps(flat, indent=2, sort_keys=True)


def from_json(
    text: str, groups: Sequence[type], *, preset: str = "local"
) -> dict[type, Any]:
    """:func:`build` from a flat JSON object (as :func:`to_json` writes)."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise OptionError("options JSON must be an object")
    return build(groups, data, preset=preset)


def schema(groups: Sequence[type] = GROUPS) -> dict[str, Any]:
    """Every option of *groups*: group, type, default, help, choices."""
    return {
        f.name: {
            "group": group.__name__,
            "type": type(f.default).__name__,
            "default": f.default,
            "help": f.metadata.get("help", ""),
            "choices": list(f.metadata.get("choices", ())),
        }
        for group, f in _fields(groups)
    }


@dataclass(frozen=True)
class Chosen:
    """What a generated task was given: one instance per group, plus the
    task's own flags (*extra*)."""

    groups: Mapping[type, Any]
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, group: type[T]) -> T:
        instance: T = self.groups[group]
        return instance


Body = Callable[[Context, Chosen], None]
OPTIONS_FLAG = "options"  # every generated task: --options FILE.json


def task(
    *groups: type,
    preset: str = "local",
    name: str | None = None,
    extra: Mapping[str, tuple[Any, str]] | None = None,
    defaults: Mapping[str, Any] | None = None,
    check: Callable[[Chosen], None] | None = None,
) -> Callable[[Body], Task[Any]]:
    """Decorator: an invoke task whose flags are the options of *groups*.

    The decorated ``body(c, chosen)`` gets a :class:`Chosen` (``chosen[
    LoadOptions]`` is the load group); *extra* adds task-only flags ``{name:
    (default, help)}``, found in ``chosen.extra``; *defaults* changes this
    task's defaults beyond the preset's; *check* raises :class:`OptionError`
    for what this task cannot run (:func:`nodes_to_start`).  A bad value
    exits with code 2 and the reason.
    """
    extra = dict(extra or {})
    values = {**preset_defaults(groups, preset), **(defaults or {})}
    fields = _fields(groups)
    helps = {f.name: f.metadata.get("help", "") for _g, f in fields}
    narrowed = {
        f.name: f.metadata["cli_choices"]
        for _g, f in fields
        if f.metadata.get("cli_choices")
    }
    listed = {
        f.name: f.metadata.get("cli_choices") or f.metadata.get("choices", ())
        for _g, f in fields
    }
    cli_names = list(helps)
    params = [inspect.Parameter("c", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for opt in cli_names:
        params.append(
            inspect.Parameter(opt, inspect.Parameter.KEYWORD_ONLY, default=values[opt])
        )
    for opt, (default, _help) in extra.items():
        params.append(
            inspect.Parameter(opt, inspect.Parameter.KEYWORD_ONLY, default=default)
        )
    params.append(
        inspect.Parameter(OPTIONS_FLAG, inspect.Parameter.KEYWORD_ONLY, default="")
    )
    help_text = {
        opt: f"{text}{_choices(listed[opt])} (default {_shown(values[opt])})"
        for opt, text in helps.items()
    }
    help_text.update(
        {opt: f"{text} (default {_shown(d)})" for opt, (d, text) in extra.items()}
    )
    help_text[OPTIONS_FLAG] = (
        "a JSON object of these options by name (python -m plexilab.options "
        "lists them); flags set to other than their default override it"
    )

    def decorate(body: Body) -> Task[Any]:
        def run(c: Context, **kw: Any) -> None:
            given = {k: kw[k] for k in cli_names if k in kw}
            try:
                if kw.get(OPTIONS_FLAG):
                    given = {
                        **_read(kw[OPTIONS_FLAG], cli_names),
                        **{k: v for k, v in given.items() if v != values[k]},
                    }
                for opt, allowed in narrowed.items():
                    if opt in given and given[opt] not in allowed:
                        shown = ", ".join(repr(a) for a in allowed)
                        raise OptionError(
                            f"--{flag(opt)} must be one of {shown}, not {given[opt]!r}"
                        )
                built = build(groups, {**(defaults or {}), **given}, preset=preset)
                if check is not None:
                    check(Chosen(built))
            except OptionError as exc:
                raise Exit(str(exc), code=2) from None
            own = {k: kw.get(k, d) for k, (d, _h) in extra.items()}
            body(c, Chosen(built, own))

        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__name__ = body.__name__
        run.__doc__ = body.__doc__
        run.__module__ = body.__module__
        return Task(run, name=name, help=help_text, auto_shortflags=False)

    return decorate


def nodes_to_start(chosen: Chosen) -> None:
    """A task check: ``--nodes`` is a count (only an inventory reads 0 as one
    node per host)."""
    if chosen[ClusterOptions].nodes < 1:
        raise OptionError("--nodes must be at least 1")


def _read(path: str, names: Sequence[str]) -> dict[str, Any]:
    """The options in the JSON file *path* (only *names* are allowed)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise OptionError(f"--{OPTIONS_FLAG} {path}: {exc}") from None
    if not isinstance(data, dict):
        raise OptionError(f"--{OPTIONS_FLAG} {path}: not a JSON object")
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise OptionError(
            f"--{OPTIONS_FLAG} {path}: unknown option(s) {', '.join(unknown)}; "
            f"known: {', '.join(names)}"
        )
    return data


def _choices(allowed: Sequence[Any]) -> str:
    return f"; one of {', '.join(map(_shown, allowed))}" if allowed else ""


def _shown(value: Any) -> str:
    if value == "":
        return "none"
    if isinstance(value, float) and value.is_integer():
        return f"{value:g}"
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m plexilab.options``: every option as JSON (for the nightly)."""
    del argv
    print(json.dumps(schema(), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
