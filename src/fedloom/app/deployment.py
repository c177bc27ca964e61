"""A job deployed across sites: :func:`serve` runs its server and records the run, :func:`connect` joins it as one
site. ``fedloom server`` and ``fedloom client`` are these two calls behind flags.

    import fedloom as fl
    job = fl.load_job("digits")
    # on the server (tokens made first: fedloom token create NAME --run-dir runs/fed)
    run = fl.serve(job, address="0.0.0.0:7500", rounds=3, min_clients=3, run_dir="runs/fed",
                   tls=fl.ServerTLS(certs="certs"))
    # at each site
    fl.connect(job, server="server.example.org:7500", data="client-000.npz", token="flt_...",
               tls=fl.ClientTLS(ca="ca.pem"))
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc

from fedloom.app.job import Job, describe
from fedloom.app.jobdigest import bind_job, job_digest, param_spec
from fedloom.app.preflight import check_model_size, check_room
from fedloom.app.protection import PrivacySettings, with_protection
from fedloom.app.run import Run, run_recorded
from fedloom.core.checkpoint import load_params
from fedloom.core.errors import ConfigError, DataError, DivergedError, FedloomError, TransportError, user_code
from fedloom.core.params import Params
from fedloom.data.base import ClientData, Dataset
from fedloom.data.clientfile import load_client_data
from fedloom.privacy.paillier import KeyPair
from fedloom.runtime.client import client_app
from fedloom.runtime.net.client import Backoff, run_client
from fedloom.runtime.net.server import FleetServer
from fedloom.runtime.net.tls import channel_credentials, fetch_ca, server_credentials
from fedloom.runtime.net.validity import dated_certificates, handshake_cause
from fedloom.runtime.records import ClientEvent, ClientStatus, RoundObserver, RoundRecord
from fedloom.runtime.state import DirectoryState
from fedloom.strategy.base import Strategy
from fedloom.tracking import Exporter, RunRecorder
from fedloom.tracking.recorder import CHECKPOINT_DIR
from fedloom.tracking.tokens import TokenStore

__all__ = ["CLIENT_TLS_MISSING", "SERVER_TLS_MISSING", "ClientTLS", "ServerTLS", "connect", "serve"]

announce = logging.getLogger("fedloom.run")  # the deployment's headlines: the CLI prints these

SERVER_TLS_MISSING = (
    "the server needs TLS: pass --certs DIR with the files of `fedloom certs init --out DIR --host HOST`, "
    "or --insecure to run without TLS on a trusted network"
)
CLIENT_TLS_MISSING = (
    "the client needs TLS: pass --ca with the federation's ca.pem, or --ca-fingerprint with the fingerprint in "
    "your invitation, or --insecure to connect without TLS to a server that runs with --insecure"
)


@dataclass(frozen=True)
class ServerTLS:
    """How a server secures its connections: TLS with ``certs`` (the folder of ``fedloom certs init``: its
    ``server.pem`` and ``server.key``), accepting only clients whose certificate its ``ca.pem`` signed when
    ``mutual``; or, with ``insecure``, no TLS at all (unencrypted traffic, tokens in the clear: a trusted
    network only). One of the two must be chosen; :class:`ConfigError` says so, as it does for ``insecure``
    with ``certs`` or ``mutual``, and for ``mutual`` without ``certs``."""

    certs: str | Path | None = None
    mutual: bool = False
    insecure: bool = False

    def __post_init__(self) -> None:
        if self.insecure and (self.certs is not None or self.mutual):
            raise ConfigError("--insecure runs without TLS; it cannot be combined with --certs or --mutual-tls")
        if self.mutual and self.certs is None:
            raise ConfigError("--mutual-tls needs --certs DIR (its ca.pem signs the client certificates)")
        if self.certs is None and not self.insecure:
            raise ConfigError(SERVER_TLS_MISSING)

    def credentials(self) -> grpc.ServerCredentials | None:
        """The server's gRPC credentials (``None`` without TLS); :class:`ConfigError` for a missing or
        mismatched certificate file. A certificate outside its validity period by this machine's clock (the
        server's, its CA's, or under ``mutual`` a site's in ``certs/clients/``) is logged as a warning: gRPC
        says nothing when a handshake fails for it."""
        if self.certs is None:
            return None
        credentials = server_credentials(self.certs, mutual=self.mutual)
        for line in dated_certificates(self.certs, mutual=self.mutual):
            logging.getLogger("fedloom.server").warning("%s", line)
        return credentials

    @property
    def summary(self) -> str:
        return "without TLS" if self.certs is None else "with mutual TLS" if self.mutual else "with TLS"


@dataclass(frozen=True)
class ClientTLS:
    """How a site checks the server: TLS trusting only the federation's CA, given as its ``ca`` file
    (``ca.pem``) or as the ``ca_fingerprint`` of an invitation (``sha256:...``; the CA is then taken from the
    server and trusted only if it matches), presenting ``cert`` and ``key`` to a server with mutual TLS; or,
    with ``insecure``, no TLS (to a server that runs without it). :class:`ConfigError` for a choice that is
    missing or contradicts itself."""

    ca: str | Path | None = None
    ca_fingerprint: str | None = None
    cert: str | Path | None = None
    key: str | Path | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        trusted = self.ca is not None or self.ca_fingerprint is not None
        own = self.cert is not None or self.key is not None
        if self.insecure and (trusted or own):
            raise ConfigError(
                "--insecure connects without TLS; it cannot be combined with --ca, --ca-fingerprint, --cert or --key"
            )
        if self.ca is not None and self.ca_fingerprint is not None:
            raise ConfigError("give the CA once: --ca (a file) or --ca-fingerprint (from an invitation), not both")
        if not trusted and own:
            raise ConfigError("--cert and --key need --ca or --ca-fingerprint, to check the server")
        if not trusted and not self.insecure:
            raise ConfigError(CLIENT_TLS_MISSING)

    def credentials(self, server: str, retry_for: float) -> grpc.ChannelCredentials | None:
        """The site's gRPC credentials for ``server`` (``None`` without TLS). With a fingerprint, the CA is
        fetched from the server first, trying for ``retry_for`` seconds while it cannot be reached."""
        trusted: str | Path | bytes | None = self.ca
        backoff = Backoff(retry_for, f"the server at {server}")
        while self.ca_fingerprint is not None and trusted is None:
            try:
                trusted = fetch_ca(server, self.ca_fingerprint)
            except TransportError as exc:
                backoff.wait(str(exc))
        return None if trusted is None else channel_credentials(trusted, self.cert, self.key)

    def explain(self, server: str) -> Callable[[str], str | None] | None:
        """What tells a failed handshake with ``server`` from gRPC's account of it by the certificates' dates
        (see :func:`~fedloom.runtime.net.validity.handshake_cause`); ``None`` without TLS."""
        if self.insecure:
            return None
        return functools.partial(handshake_cause, server=server, ca=self.ca, cert=self.cert)


def serve(
    job: Job,
    *,
    address: str,
    rounds: int,
    min_clients: int,
    run_dir: str | Path,
    tls: ServerTLS,
    seed: int = 0,
    round_timeout: float = 300.0,
    join_timeout: float = 600.0,
    max_message_bytes: int = 4096 * 2**20,
    max_uploads: int = 4,
    heartbeat: float = 30.0,
    strategy: Strategy[Any] | None = None,
    privacy: PrivacySettings | None = None,
    dp_clients: int | None = None,
    exporters: Sequence[Exporter] = (),
    db_url: str | None = None,
    observers: Sequence[RoundObserver] = (),
    exclude: Sequence[str] = (),
    from_checkpoint: str | Path | None = None,
) -> Run:
    """Serve ``job`` to the sites that dial ``address`` (``HOST:PORT``, only this address), run ``rounds`` rounds
    once ``min_clients`` of them have joined, and return the recorded :class:`~fedloom.app.run.Run`.

    ``run_dir`` is the deployment's run directory: the sites' tokens (made beforehand with
    :class:`~fedloom.tracking.tokens.TokenStore`, or ``fedloom token create``), the round log and the
    checkpoints; a run directory whose run stopped before its end is resumed after its last completed round,
    given the same settings. ``tls`` says how connections are secured. ``seed`` seeds the initial model and
    client sampling. Each round's phase waits ``round_timeout`` seconds for replies, and the first round waits
    ``join_timeout`` seconds for the sites. ``max_message_bytes`` bounds a site's reply, ``max_uploads`` the
    replies received at once, and ``heartbeat`` is the seconds between keepalive pings (see
    :class:`~fedloom.runtime.net.server.FleetServer`). ``strategy`` runs instead of the job's; ``privacy`` wraps
    it (:func:`~fedloom.app.protection.with_protection`), its DP over ``dp_clients`` clients (default: the run
    directory's valid tokens). ``exporters`` mirror the run elsewhere, ``db_url`` keeps its rows in a shared
    database (as :func:`~fedloom.app.simulation.simulate`), and ``observers`` see each round as it ends (after it
    is recorded). ``exclude`` names sites that are never asked to train or evaluate (they may connect): how a run
    whose model diverged resumes without the sites that made it (:class:`~fedloom.core.errors.DivergedError`
    names them, and says the command). Headlines (resuming, listening, the clients that joined, who is excluded)
    are logged at ``INFO`` on the ``fedloom.run`` logger.

    The run is bound to the job (:mod:`fedloom.app.jobdigest`): ``run_dir`` records its digest, a resume under
    another job is refused naming what changed, and a site whose job's digest differs is refused before it
    trains. ``from_checkpoint`` starts a new run from the model in a checkpoint file, or in the last checkpoint
    of a run directory, instead of the job's initial model (it must have the model's parameters: names, dtypes
    and shapes): how a changed job goes on from a run's model in a new run directory.

    Before it binds ``address``, the model is checked against ``max_message_bytes``, and the run directory must
    be writable and have room for a round (:mod:`fedloom.app.preflight`). When the run is over the server says
    bye and the sites end. Raises :class:`ConfigError` for settings that cannot work (no tokens, bad
    certificates, protections the strategy cannot take, ``paillier=True``, a model over ``max_message_bytes``),
    :class:`~fedloom.core.errors.RunStoreError` for a run directory that cannot take a round
    (:class:`~fedloom.core.errors.NoSpaceError` where space is short), :class:`TransportError` when ``address``
    cannot be listened on, and :class:`~fedloom.core.errors.NotEnoughClientsError` when too few sites join in
    time; a run that fails after it started is recorded as failed, with its error, and the error is raised
    again.
    """
    if rounds < 1 or min_clients < 1:
        raise ConfigError(f"a deployment needs rounds >= 1 and min_clients >= 1, got {rounds} and {min_clients}")
    if privacy is not None and privacy.paillier is True:  # a simulation makes its clients' keys; sites hold theirs
        raise ConfigError(
            "a deployment aggregates under its sites' Paillier key: give PrivacySettings(paillier=) their public "
            "key (fedloom privacy paillier-keys writes it to paillier.pub)"
        )
    credentials = tls.credentials()
    tokens = TokenStore(run_dir)
    valid = tokens.count_valid()
    if valid == 0:
        raise ConfigError(
            f"no client tokens in {run_dir}: make one per site with `fedloom token create NAME --run-dir {run_dir}` "
            "(or `fedloom invite NAME ...`)"
        )
    if strategy is not None:
        job = dataclasses.replace(job, strategy=strategy)
    if privacy is not None:
        job = with_protection(job, privacy, num_clients=dp_clients if dp_clients is not None else valid)
    with user_code(f"the model of job {job.name!r} (init_params)"):
        initial = job.task.init_params(seed)
    digest = job_digest(job, initial)
    if from_checkpoint is not None:
        initial = _starting_params(Path(from_checkpoint), initial)
    identity = {
        "job": job.name,
        "job_digest": digest.sha256,
        "backend": "deployment",
        "task": describe(job.task),
        "strategy": describe(job.strategy),
        "rounds": rounds,
        "seed": seed,
        **({"from_checkpoint": initial.sha256()} if from_checkpoint is not None else {}),
    }
    check_model_size(initial, max_message_bytes)
    check_room(run_dir, initial)
    server = FleetServer(  # binds the address now, so a port in use fails before anything is recorded
        address,
        authenticate=tokens.authenticate,
        credentials=credentials,
        max_message_bytes=max_message_bytes,
        max_uploads=max_uploads,
        heartbeat=heartbeat,
        job_digest=digest.sha256,
    )
    try:
        bind_job(run_dir, digest)  # a resume under another job is refused here, naming what changed
        recorder, resume = RunRecorder.open(run_dir, job.name, identity, exporters, url=db_url)
    except BaseException:
        server.stop(0)
        raise
    if resume is not None:
        announce.info("resuming run %s after round %d of %d", recorder.run_id, resume.completed_rounds, rounds)
    if exclude:
        announce.info("excluded from the rounds: %s", ", ".join(sorted(exclude)))
    with server:
        announce.info(
            "fedloom server: job %s (%s), listening on %s %s, waiting for %d clients",
            job.name,
            digest.sha256,
            address,
            tls.summary,
            min_clients,
        )
        try:
            clients = server.wait_for_clients(min_clients, join_timeout)
        except FedloomError as exc:
            recorder.on_events(server.take_events())  # who came, and who was refused
            recorder.finish(resume.params if resume else initial, status="failed", error=str(exc))
            raise
        announce.info("clients connected: %s", ", ".join(clients))
        timeline = _Timeline(server, recorder)
        try:
            result = run_recorded(
                recorder,
                strategy=job.strategy,
                grid=server.grid,
                initial_params=initial,
                rounds=rounds,
                seed=seed,
                observers=[timeline, *observers],
                timeout=round_timeout,
                resume=resume,
                on_close=timeline.close,
                exclude=frozenset(exclude),
            )
        except DivergedError as exc:
            raise DivergedError(exc.server_round, exc.norms, hint=_resume_hint(exc, exclude)) from None
    return Run(recorder.run_id, recorder.run_dir, result.params, result.history, "deployment")


def _starting_params(source: Path, model: Params) -> Params:
    """The params a run starts from with ``from_checkpoint``: the checkpoint file ``source``, or the last
    checkpoint of the run directory ``source``, in the order of the job's ``model``. :class:`ConfigError` when
    there is none, or when they are not the model's parameters; :class:`RunStoreError` for an unreadable file."""
    path = source
    if source.is_dir():
        found = sorted((source / CHECKPOINT_DIR).glob("round_[0-9]*[0-9].safetensors"))  # not the strategy's
        if not found:
            raise ConfigError(f"--from-checkpoint: {source} holds no checkpoint ({CHECKPOINT_DIR}/round_*.safetensors)")
        path = found[-1]
    params = load_params(path)
    differ = [
        f"{name} is {param_spec(params[name]) if name in params else 'missing'} there, {param_spec(array)} in the model"
        for name, array in model.items()
        if name not in params or param_spec(params[name]) != param_spec(array)
    ]
    differ += [f"{name} is not in the model" for name in params if name not in model]
    if differ:
        raise ConfigError(
            f"--from-checkpoint: {path} does not hold this job's model ({'; '.join(differ[:3])}"
            + (f"; and {len(differ) - 3} more" if len(differ) > 3 else "")
            + "); a changed model starts from its own initial params in a new run"
        )
    announce.info("starting from %s (params_sha256 %s)", path, params.sha256())
    return Params({name: params[name] for name in model})


def _resume_hint(error: DivergedError, excluded: Sequence[str]) -> str:
    """How to go on from the last good round without the sites whose updates stood out."""
    sites = sorted({*excluded, *error.suspects})
    if not error.suspects:
        return "to resume after it, run the same command again (with --exclude SITE for any site you distrust)"
    return f"to resume after it without them, run the same command again with --exclude {','.join(sites)}"


class _Timeline:
    """After each round: tells each client whose reply was refused why, and records the clients' events
    (connections, instructions, replies, refusals, drops) in the run's timeline."""

    def __init__(self, server: FleetServer, recorder: RunRecorder) -> None:
        self._server = server
        self._recorder = recorder

    def on_round(self, record: RoundRecord, params: Params) -> None:
        events = self._server.take_events()
        now = datetime.now(timezone.utc)
        for client in record.clients:
            if client.status != ClientStatus.REFUSED:
                continue
            reason = f"round {record.server_round}: the server refused your {client.phase} reply: {client.detail}"
            self._server.notify(client.client_id, reason)
            events.append(ClientEvent(now, client.client_id, "refused", record.server_round, detail=client.detail))
        self._recorder.on_events(events)

    def close(self, error: BaseException | None) -> None:
        """Record the events since the last round: those of a round that failed, or, when the run is over, the
        clients leaving after the server says bye. A run that failed or was interrupted says no bye: the
        clients keep trying to reconnect, and rejoin when the same run is served again."""
        if error is None:
            self._server.say_bye()
        self._recorder.on_events(self._server.take_events())


def connect(
    job: Job,
    *,
    server: str,
    data: str | Path | ClientData,
    token: str,
    tls: ClientTLS,
    retry_for: float = 600.0,
    heartbeat: float = 30.0,
    state_dir: str | Path = "fedloom-client-state",
    paillier_key: KeyPair | None = None,
    send_logs: bool = True,
) -> int:
    """Join the federation at ``server`` (``HOST:PORT``) as the site that ``token`` names, train ``job``'s task on
    this site's ``data`` until the server says bye, and return how many instructions were answered.

    ``data`` is the site's :class:`~fedloom.data.base.ClientData`, a client-data ``.npz`` file (as ``fedloom
    partition`` writes), or a folder that the job's data function reads (its train and test splits become the
    site's data). ``tls`` says how the server is checked. The connection is lost and found again by itself:
    the site keeps trying for ``retry_for`` seconds from the start or from when it lost the server.
    ``heartbeat`` is the seconds between keepalive pings. ``state_dir`` keeps what an algorithm carries between
    rounds (SCAFFOLD's control variate), across restarts. The site answers through
    :func:`~fedloom.runtime.client.client_app` with the job's own mods. ``paillier_key`` is the federation's
    Paillier key pair,
    for a server that aggregates under Paillier. ``send_logs=False`` keeps the lines this site logs while it
    trains off the wire. The hello names the job's digest (:mod:`fedloom.app.jobdigest`): a server that runs
    another job refuses this site, naming both digests. Raises :class:`DataError` for data that cannot be read, and what
    :func:`~fedloom.runtime.net.client.run_client` raises (:class:`TransportError` when the server stays out of
    reach, refuses this site or does not match its TLS).
    """
    # Named in the hello: a server that runs another job refuses this site. Taken before the data is read, as the
    # server takes it: what the data function imports then is not the job's (see fedloom.app.jobdigest).
    digest = job_digest(job)
    own = data if isinstance(data, ClientData) else _own_data(job, Path(data))
    credentials = tls.credentials(server, retry_for)
    app = client_app(job.task, job.mods, paillier_key=paillier_key, send_logs=send_logs, deployed=True)
    return run_client(
        app,
        own,
        server=server,
        token=token,
        retry_for=retry_for,
        heartbeat=heartbeat,
        credentials=credentials,
        state=DirectoryState(state_dir),
        job_digest=digest.sha256,
        explain=tls.explain(server),
    )


def _own_data(job: Job, path: Path) -> ClientData:
    """A client-data file as it is, or the dataset that the job's data function reads from a folder."""
    if path.is_dir():
        loaded = job.load_data(str(path))
        if not isinstance(loaded, Dataset):
            raise DataError(f"the data function of job {job.name!r} made a whole federation, not one site's data")
        return ClientData(train=loaded.train, test=loaded.test)
    return load_client_data(path)
