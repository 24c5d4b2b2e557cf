"""When the nightly runs: a systemd timer where systemd runs, else a crontab line.

systemd (``/run/systemd/system`` exists and ``systemctl`` is on the PATH):
two units, written to ``/etc/systemd/system`` for root and to
``~/.config/systemd/user`` (``systemctl --user``) for other users:

* ``plexilab-nightly.service``: ``Type=oneshot``, ``./lab invoke nightly`` in
  the repo (output in the journal: ``journalctl -u plexilab-nightly``);
* ``plexilab-nightly.timer``: ``OnCalendar=*-*-* HH:MM:00`` with
  ``Persistent=true`` (a night missed while the machine was off runs at the
  next boot),

then ``systemctl daemon-reload`` and ``systemctl enable --now
plexilab-nightly.timer``.  Without systemd the documented crontab line
(:func:`cron_line`) goes into this user's crontab instead, replacing only this
repo's earlier line.  :func:`uninstall` removes either.

Everything that touches the system takes its unit directory, its
``systemctl`` runner and its ``crontab`` program as arguments, so tests use
temporary ones.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from plexilab.nightly.config import REPO, NightlyError

UNIT = "plexilab-nightly"
CRON_MARKER = "# plexilab-nightly"
SYSTEMD_RUNTIME = Path("/run/systemd/system")

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def run_command(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """The real runner: *argv* with its output captured."""
    return subprocess.run(
        list(argv), capture_output=True, text=True, check=False, timeout=120
    )


def crontab_program() -> str | None:
    """The ``crontab`` program on the PATH (None: no cron here)."""
    return shutil.which("crontab")


def systemd_running(runtime: Path = SYSTEMD_RUNTIME) -> bool:
    """Whether systemd is the init system here (sd_booted) with systemctl."""
    return runtime.is_dir() and shutil.which("systemctl") is not None


@dataclass(frozen=True)
class Scope:
    """Where the units go and how systemctl reaches that manager."""

    unit_dir: Path
    systemctl: tuple[str, ...] = ("systemctl",)

    @property
    def journal(self) -> str:
        user = " --user" if "--user" in self.systemctl else ""
        return f"journalctl{user} -u {UNIT}"


def default_scope() -> Scope:
    """The system manager for root, this user's manager otherwise."""
    if os.geteuid() == 0:
        return Scope(Path("/etc/systemd/system"))
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Scope(Path(config) / "systemd" / "user", ("systemctl", "--user"))


def _check_time(hour: int, minute: int) -> None:
    if not 0 <= hour <= 23 or not 0 <= minute <= 59:
        raise NightlyError(f"bad time {hour}:{minute:02d} (hour 0-23, minute 0-59)")


# -- systemd ----------------------------------------------------------------------


def _unit_quote(arg: str) -> str:
    """*arg* as one word of a unit's command line (quotes, ``%`` specifiers)."""
    text = arg.replace("%", "%%")
    if text and not any(c in text for c in " \t\"'\\;"):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def units(repo: Path = REPO, hour: int = 3, minute: int = 0) -> dict[str, str]:
    """``{file name: text}`` of the service and timer that run the nightly."""
    _check_time(hour, minute)
    where = str(repo).replace("%", "%%")
    service = (
        "[Unit]\n"
        f"Description=PlexiChat nightly from {where}\n"
        "\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"WorkingDirectory={where}\n"
        f"ExecStart={_unit_quote(str(repo / 'lab'))} invoke nightly\n"
        "TimeoutStartSec=infinity\n"
    )
    timer = (
        "[Unit]\n"
        f"Description=PlexiChat nightly at {hour:02d}:{minute:02d} from {where}\n"
        "\n"
        "[Timer]\n"
        f"OnCalendar=*-*-* {hour:02d}:{minute:02d}:00\n"
        "Persistent=true\n"
        f"Unit={UNIT}.service\n"
        "\n"
        "[Install]\n"
        "WantedBy=timers.target\n"
    )
    return {f"{UNIT}.service": service, f"{UNIT}.timer": timer}


def _systemctl(scope: Scope, run: Runner, *args: str) -> None:
    argv = [*scope.systemctl, *args]
    done = run(argv)
    if done.returncode != 0:
        raise NightlyError(f"{shlex.join(argv)} failed: {done.stderr.strip()}")


def install_timer(
    scope: Scope,
    run: Runner = run_command,
    repo: Path = REPO,
    hour: int = 3,
    minute: int = 0,
) -> str:
    """Write the units into *scope*, reload and enable the timer.

    Returns ``installed``, ``replaced`` (other units were there) or
    ``already installed``; the timer is enabled and started either way.
    """
    texts = units(repo, hour, minute)
    scope.unit_dir.mkdir(parents=True, exist_ok=True)
    before = {
        name: (scope.unit_dir / name).read_text()
        for name in texts
        if (scope.unit_dir / name).exists()
    }
    for name, text in texts.items():
        if before.get(name) != text:
            (scope.unit_dir / name).write_text(text)
    _systemctl(scope, run, "daemon-reload")
    _systemctl(scope, run, "enable", "--now", f"{UNIT}.timer")
    if before == texts:
        return "already installed"
    return "replaced" if before else "installed"


def uninstall_timer(
    scope: Scope, run: Runner = run_command, repo: Path | None = None
) -> str:
    """Stop and disable the timer, remove both units; ``removed``/``not installed``.

    With *repo*, units that run the nightly of another checkout are left alone.
    """
    paths = [scope.unit_dir / name for name in units()]
    if not any(p.exists() for p in paths):
        return "not installed"
    service = scope.unit_dir / f"{UNIT}.service"
    if repo is not None and service.exists():
        mine = units(repo)[service.name].splitlines()
        theirs = service.read_text().splitlines()
        workdir = [x for x in theirs if x.startswith("WorkingDirectory=")]
        if workdir and workdir[0] not in mine:
            return f"left alone: the units run {workdir[0].split('=', 1)[1]}"
    _systemctl(scope, run, "disable", "--now", f"{UNIT}.timer")
    for path in paths:
        path.unlink(missing_ok=True)
    _systemctl(scope, run, "daemon-reload")
    return "removed"


# -- cron (no systemd) -------------------------------------------------------------


def cron_line(repo: Path = REPO, hour: int = 3, minute: int = 0) -> str:
    """The crontab line that runs the nightly from *repo* through ``./lab``."""
    _check_time(hour, minute)
    where = shlex.quote(str(repo))
    return (
        f"{minute} {hour} * * * cd {where} && mkdir -p reports && "
        f"./lab invoke nightly >> reports/cron.log 2>&1 {CRON_MARKER} {repo}"
    )


def _crontab(
    args: Sequence[str], crontab: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [crontab, *args], input=stdin, capture_output=True, text=True, check=False
    )


def _crontab_lines(crontab: str) -> list[str]:
    current = _crontab(["-l"], crontab)
    if current.returncode != 0 and "no crontab" not in current.stderr.lower():
        raise NightlyError(f"crontab -l failed: {current.stderr.strip()}")
    return current.stdout.splitlines() if current.returncode == 0 else []


def _write_crontab(lines: Sequence[str], crontab: str) -> None:
    done = _crontab(["-"], crontab, stdin="".join(f"{x}\n" for x in lines))
    if done.returncode != 0:
        raise NightlyError(f"crontab - failed: {done.stderr.strip()}")


def install_cron(
    line: str,
    repo: Path = REPO,
    crontab: str = "crontab",
) -> str:
    """Put *line* in the user's crontab, replacing this repo's earlier line only.

    Other entries are kept as they are; returns what was done.
    """
    lines = _crontab_lines(crontab)
    mine = f"{CRON_MARKER} {repo}"
    kept = [x for x in lines if not x.rstrip().endswith(mine)]
    if line in lines and len(kept) == len(lines) - 1:
        return "already installed"
    _write_crontab([*kept, line], crontab)
    return "replaced" if len(kept) < len(lines) else "installed"


def uninstall_cron(repo: Path = REPO, crontab: str = "crontab") -> str:
    """Remove this repo's line from the user's crontab (others are kept)."""
    lines = _crontab_lines(crontab)
    mine = f"{CRON_MARKER} {repo}"
    kept = [x for x in lines if not x.rstrip().endswith(mine)]
    if len(kept) == len(lines):
        return "not installed"
    _write_crontab(kept, crontab)
    return "removed"


# -- what the task does ----------------------------------------------------------


NO_CRON = (
    "crontab not found: install cron first (apt-get install -y cron) and make "
    "sure the cron service runs"
)


@dataclass(frozen=True)
class Plan:
    """The schedule chosen for this machine: timer units or the crontab line."""

    repo: Path
    hour: int
    minute: int
    line: str
    scope: Scope | None  # None: the crontab line
    units: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """What is (or would be) installed, for printing."""
        if self.scope is None:
            return self.line
        parts = [
            f"# {self.scope.unit_dir / name}\n{text}"
            for name, text in self.units.items()
        ]
        parts.append(
            f"# enable: {shlex.join([*self.scope.systemctl, 'enable', '--now'])} "
            f"{UNIT}.timer; output: {self.scope.journal}\n"
            f"# without systemd, the crontab line instead:\n# {self.line}"
        )
        return "\n".join(parts)


def choose(
    repo: Path = REPO,
    hour: int = 3,
    minute: int = 0,
    *,
    scope: Scope | None = None,
) -> Plan:
    """The timer units in *scope* (systemd), or the crontab line (None)."""
    line = cron_line(repo, hour, minute)
    texts = units(repo, hour, minute) if scope is not None else {}
    return Plan(repo, hour, minute, line, scope, texts)


def install(plan: Plan, run: Runner, crontab: str | None) -> list[str]:
    """Install *plan*; one line per thing done.

    The timer replaces this repo's crontab line (removed if there was one),
    so the nightly never runs twice.
    """
    if plan.scope is None:
        if crontab is None:
            raise NightlyError(NO_CRON)
        return [f"crontab: {install_cron(plan.line, plan.repo, crontab)}"]
    done = install_timer(plan.scope, run, plan.repo, plan.hour, plan.minute)
    where = plan.scope.unit_dir
    out = [f"systemd timer: {done} in {where}; {UNIT}.timer enabled and started"]
    if crontab is not None and uninstall_cron(plan.repo, crontab) == "removed":
        out.append("crontab: removed this repo's line (the timer replaces it)")
    return out


def uninstall(plan: Plan, run: Runner, crontab: str | None) -> list[str]:
    """Remove the timer units (systemd) and this repo's crontab line."""
    out = []
    if plan.scope is not None:
        out.append(f"systemd timer: {uninstall_timer(plan.scope, run, plan.repo)}")
    if crontab is not None:
        out.append(f"crontab: {uninstall_cron(plan.repo, crontab)}")
    return out or ["nothing to remove: no systemd here and no crontab program"]
