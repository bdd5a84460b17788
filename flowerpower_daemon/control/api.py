"""What the control commands need from the running daemon: :class:`DaemonControl`.

:mod:`.commands` speaks to this Protocol only, never to the service layer
that implements it (``service/controls.py``), so the control plane can be
read, and tested, without the daemon's wiring. The rows and reports it
hands back are typed here (TypedDicts are the JSON the client gets).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol, TypedDict

from ..project.api import FlowerPowerProject
from ..project.models import RunRequest, RunResult
from ..settings import Settings, Trigger
from ..state.history import JobHistory
from ..state.schedules import Schedule, ScheduleStore
from .events import EventBus

__all__ = [
    "ActiveRun",
    "CountersInfo",
    "DaemonControl",
    "FleetDaemon",
    "FleetInfo",
    "FleetStatusInfo",
    "JobState",
    "JobSummary",
    "ReloadReport",
    "RunAnswer",
    "StatusInfo",
    "TriggerOrigin",
    "TriggerRow",
    "TriggerStatus",
    "WorkerInfo",
]

#: Where a trigger comes from: the config file, a pipeline's ``schedule:``, ``schedule add``.
TriggerOrigin = Literal["config", "project", "dynamic"]
JobState = Literal["scheduled", "queued", "running"]


class TriggerRef(TypedDict):
    name: str
    type: str


class JobSummary(TypedDict):
    """An active run as ``jobs``, ``job`` and ``status`` show it (history rows: same keys)."""

    run_id: str
    pipeline: str
    trigger: TriggerRef
    state: str
    queued_at: str
    run_at: str | None
    started_at: str | None
    finished_at: str | None
    duration_ms: float | None
    attempts: int
    error: Mapping[str, str] | None


class ActiveRun(Protocol):
    """A run that has not finished (scheduled, queued or running)."""

    @property
    def request(self) -> RunRequest: ...

    @property
    def state(self) -> JobState: ...

    def summary(self) -> JobSummary: ...


@dataclass(frozen=True, slots=True)
class TriggerStatus:
    """One trigger as ``triggers``/``schedules`` show it: its config and its run-time state."""

    cfg: Trigger
    origin: TriggerOrigin
    paused: bool
    next_fire: datetime | None
    fired: int
    ok: int
    failed: int
    skipped: int
    running: int
    created_at: str | None = None  # dynamic schedules only


class TriggerRow(TypedDict, total=False):
    """One row of ``triggers`` (``schedules`` adds ``inputs`` and ``created_at``)."""

    name: str
    type: str
    pipeline: str
    origin: str
    spec: str
    enabled: bool
    paused: bool
    next_fire: str | None
    fired: int
    ok: int
    failed: int
    skipped: int
    running: int
    inputs: dict[str, object]
    created_at: str | None


class RunAnswer(TypedDict, total=False):
    run_id: str
    state: str
    run_at: str | None
    result: object


class ReloadReport(TypedDict):
    """What a reload changed (trigger and pipeline names) and what needs a restart."""

    added: list[str]
    removed: list[str]
    changed: list[str]
    pipelines_added: list[str]
    pipelines_removed: list[str]
    pipelines: list[str]  # every pipeline now loaded: all re-read, edited code included
    restart_required: list[str]


class MqttInfo(TypedDict):
    broker: str
    client_id: str  # this daemon's (a fleet's daemons each have their own)
    connected: bool
    connects: int
    outbox: int
    published: int
    held: int
    intake_pauses: int


class QueueInfo(TypedDict):
    backend: Literal["redis", "memory"]
    broker: str  # credentials redacted
    shared_state: str | None  # ``shared_state`` (credentials redacted), None when unset


class CountersInfo(TypedDict):
    messages_in: int
    events: int
    runs_ok: int
    runs_failed: int
    bad_input: int
    skipped: int
    duplicates: int
    coalesced: int
    unmatched: int
    results_out: int


class HistoryInfo(TypedDict):
    recorded: int
    location: str | None


class ClientsInfo(TypedDict):
    clients: int
    requests: int


class WorkerInfo(TypedDict):
    """A live ``flowerpower-daemon worker`` of the Redis queue (``status``'s ``workers``)."""

    name: str  # <hostname>:<pid>, as results name it in "worker"
    in_flight: int  # runs it executes now
    done: int  # runs it finished since it started
    concurrency: int  # queue.worker_concurrency
    started_at: str  # ISO 8601
    last_seen: str  # ISO 8601, its last beat (every 2 s)
    age_s: float  # seconds since last_seen when the daemon read it


class StatusInfo(TypedDict):
    """The answer of ``status``."""

    version: str
    pid: int
    state: Literal["starting", "running", "stopping"]
    started_at: str
    uptime_s: float
    config: str | None
    project: str
    state_dir: str
    socket: str | None
    mqtt: MqttInfo
    queue: QueueInfo
    counters: CountersInfo
    in_flight: int
    active: list[JobSummary]
    pipelines: int
    triggers: int
    paused: list[str]
    history: HistoryInfo
    control: ClientsInfo
    workers: list[WorkerInfo]  # Redis queue: the live workers (read every 2 s); memory: []


class FleetDaemon(TypedDict, total=False):
    """One daemon's retained status message, as ``status`` with ``fleet`` lists it.

    ``topic``, ``client_id``, ``status`` and ``self`` are always there; the
    others are what the daemon published (an older daemon's payload may lack some).
    """

    topic: str
    client_id: str  # the payload's, else the topic's {client_id} part ("" if neither)
    status: str  # "online" | "offline" (or the raw payload when it is not our JSON)
    self: bool  # the daemon that answers
    version: str
    pipelines: list[str]
    host: str
    pid: int


class FleetInfo(TypedDict):
    """Every daemon's retained status from the broker, and the live workers (Redis mode)."""

    topic: str  # the filter subscribed to: ``mqtt.status_topic`` with ``+`` for ``{client_id}``
    wait_s: float  # how long retained messages were collected
    daemons: list[FleetDaemon]  # sorted by client_id
    workers: list[Mapping[str, object]]  # the status answer's ``workers`` ([] without)


class FleetStatusInfo(StatusInfo):
    """The answer of ``status`` with ``fleet: true``: this daemon's status plus ``fleet``."""

    fleet: FleetInfo


class DaemonControl(Protocol):
    """The running daemon as the control commands see it: state to read, verbs to call."""

    @property
    def settings(self) -> Settings: ...

    @property
    def project(self) -> FlowerPowerProject: ...

    @property
    def ready(self) -> bool:
        """MQTT connected and subscribed, every source armed (commands may run)."""
        ...

    @property
    def stopping(self) -> bool: ...

    @property
    def events(self) -> EventBus: ...

    @property
    def history(self) -> JobHistory | None: ...

    @property
    def schedules(self) -> ScheduleStore: ...

    def status(self) -> StatusInfo: ...

    async def fleet_status(self, wait: float) -> list[FleetDaemon]:
        """Every daemon's retained status on the broker, collected for ``wait`` seconds
        (ConnectionError when the broker cannot be asked)."""
        ...

    def triggers(self) -> list[TriggerStatus]:
        """Every active trigger (config, project schedules, dynamic schedules)."""
        ...

    def active_runs(self) -> Mapping[str, ActiveRun]: ...

    def manual_request(
        self, pipeline: str, inputs: Mapping[str, object], overrides: Mapping[str, object]
    ) -> RunRequest:
        """A ``flowerpowerctl run`` request, replying on the configured result topic."""
        ...

    async def submit_run(self, request: RunRequest, *, run_at: datetime | None = None) -> JobState:
        """Start a manual run now or at ``run_at`` (persisted until then); returns at once."""
        ...

    async def wait_run(self, run_id: str) -> RunResult | None:
        """The result of an active run once it ends; None when it is not active (or cancelled)."""
        ...

    async def cancel_run(self, run_id: str) -> bool:
        """Cancel an active run; False when it is not active."""
        ...

    async def add_schedule(self, schedule: Schedule) -> None:
        """Persist and arm a dynamic schedule (replacing one with the same id)."""
        ...

    async def remove_schedule(self, schedule_id: str) -> None: ...

    async def set_paused(self, names: Sequence[str], paused: bool) -> list[str]:
        """Pause or resume triggers by name (persisted); returns the names."""
        ...

    async def reload(self) -> ReloadReport:
        """Validate the config file and project again and apply the difference (ConfigError)."""
        ...

    @property
    def leaving(self) -> bool:
        """The stop under way is ``stop --leave``'s."""
        ...

    def request_stop(self, *, leave: bool = False) -> None:
        """Begin a graceful shutdown (as SIGTERM); ``leave``: for good (see the daemon)."""
        ...
