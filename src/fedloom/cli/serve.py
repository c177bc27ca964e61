"""``fedloom serve`` (a run's global model over HTTP) and ``fedloom export`` (the model as an ONNX, TorchScript or
safetensors file)."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedloom.cli.runs import DbUrl, RunRef, RunsDir
from fedloom.cli.ui import Host, Port, bind_listener, is_loopback
from fedloom.core.errors import ConfigError

if TYPE_CHECKING:
    from fedloom.serving.model import ServedModel

TOKEN_ENV = "FEDLOOM_SERVE_TOKEN"

Round = Annotated[int | None, typer.Option("--round", help="The round whose model to use (default: the last).", min=1)]
JobRef = Annotated[
    str | None,
    typer.Option("--job", help="The job file the run was made with (default: the run's job, if a built-in example)."),
]
DataDir = Annotated[str | None, typer.Option("--data", help="The job's data folder, to read one example's shape from.")]
InputShape = Annotated[
    str | None,
    typer.Option("--input-shape", help="One example's shape, such as 64 or 1,28,28 (default: from the job's data)."),
]


def _model(
    run: str, runs: Path, db: str | None, server_round: int | None, job: str | None, data: str | None, shape: str | None
) -> ServedModel:
    from fedloom.serving.model import ServedModel
    from fedloom.tracking import RunStore

    parsed = None
    if shape is not None:
        try:
            parsed = tuple(int(n) for n in shape.split(","))
        except ValueError:
            raise ConfigError(
                f"--input-shape takes sizes separated by commas, such as 1,28,28; got {shape!r}"
            ) from None
        if not parsed or min(parsed) < 1:
            raise ConfigError(f"--input-shape needs sizes of at least 1, got {shape!r}")
    return ServedModel.load(
        RunStore(runs, db), run, server_round=server_round, job=job, data_dir=data, input_shape=parsed
    )


def serve_command(
    run: RunRef,
    runs: RunsDir = Path("runs"),
    db: DbUrl = None,
    server_round: Round = None,
    job: JobRef = None,
    data: DataDir = None,
    input_shape: InputShape = None,
    port: Port = 8000,
    host: Host = "127.0.0.1",
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar=TOKEN_ENV,
            help="Token every request must carry (Authorization: Bearer TOKEN). Bound beyond loopback without one, "
            "a random token is made and printed.",
        ),
    ] = None,
) -> None:
    """Serve a run's global model for prediction over HTTP: POST /predict {"instances": [...]} answers with the
    model's outputs and predicted classes; GET /model says what is served. Stop it with Ctrl-C."""
    try:
        import uvicorn

        from fedloom.serving.app import create_app
    except ImportError as exc:
        raise ConfigError(f"serving needs the ui extra ({exc.name} is missing): pip install 'fedloom[ui]'") from None
    model = _model(run, runs, db, server_round, job, data, input_shape)
    loopback = is_loopback(host)
    if not loopback and token is None:
        token = secrets.token_urlsafe(24)
    listener = bind_listener(host, port, "the model server")
    shown_host = f"[{host}]" if ":" in host else host
    typer.echo(
        f"serving run {model.run_id} after round {model.server_round} (input {list(model.input_shape)}) at "
        f"http://{shown_host}:{listener.getsockname()[1]}/predict"
    )
    if token is not None and not loopback:
        typer.echo(f"token: {token}  (send it as Authorization: Bearer TOKEN)")
    app = create_app(model, token=token, loopback_only=loopback)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[listener])


def export_command(
    run: RunRef,
    fmt: Annotated[str, typer.Option("--format", help="onnx, torchscript or safetensors.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="File to write (default: RUN-roundN.EXT).")] = None,
    runs: RunsDir = Path("runs"),
    db: DbUrl = None,
    server_round: Round = None,
    job: JobRef = None,
    data: DataDir = None,
    input_shape: InputShape = None,
) -> None:
    """Export a run's global model for other runtimes: ONNX (checked with onnxruntime where installed),
    TorchScript, or the params as safetensors."""
    from fedloom.serving.export import FORMATS, export

    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    model = _model(run, runs, db, server_round, job, data, input_shape)
    done = export(model, fmt, out)
    checked = "" if done.max_difference is None else f" (onnxruntime matches torch within {done.max_difference:.2g})"
    typer.echo(f"wrote {done.path}: run {model.run_id} after round {model.server_round}, {fmt}{checked}")
