"""A deployed site that lies with well-formed updates, for the tests of issue 25: run as
``python dishonest_site.py SERVER DATA TOKEN claims|scale``.

It joins as an honest ``fedloom client digits --insecure`` would (its client runtime declares its data's size in
the hello, and it names the honest job's digest), trains honestly, and then, in a client mod around its task,
rewrites each fit reply: ``claims`` says
it trained on 10^12 examples; ``scale`` sends the params it was sent plus 10^6 times its change.
"""

from __future__ import annotations

import sys

import numpy as np

from fedloom.app.job import load_job
from fedloom.app.jobdigest import job_digest
from fedloom.cli.simulate import limit_torch_threads
from fedloom.core.message import Message, MessageKind
from fedloom.core.params import Params
from fedloom.data.clientfile import load_client_data
from fedloom.runtime.client import Context, Handler, client_app
from fedloom.runtime.net.client import run_client


def lie(mode: str):
    def mod(message: Message, context: Context, call_next: Handler) -> Message:
        reply = call_next(message, context)
        if message.kind != MessageKind.FIT or reply.kind != MessageKind.FIT_RESULT:
            return reply
        if mode == "claims":
            return Message(reply.kind, reply.params, {**reply.metadata, "num_examples": 10**12})
        sent = message.params
        scaled = {
            name: (sent[name].astype(np.float64) + 1e6 * (array - sent[name])).astype(array.dtype)
            for name, array in reply.params.items()
        }
        return Message(reply.kind, Params(scaled), reply.metadata)

    return mod


def main() -> None:
    server, data, token, mode = sys.argv[1:5]
    job = load_job("digits")
    honest = job_digest(job).sha256  # a liar names the honest job's digest in its hello
    limit_torch_threads(1)  # as `fedloom client` does: torch's results depend on its thread count
    app = client_app(job.task, (*job.mods, lie(mode)), deployed=True)
    run_client(app, load_client_data(data), server=server, token=token, retry_for=60, job_digest=honest)


if __name__ == "__main__":
    main()
