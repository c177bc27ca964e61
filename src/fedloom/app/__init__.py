"""fedloom.app: what a user runs, as library calls. A job (:class:`Job`, :func:`load_job`), run as a simulated
federation (:func:`simulate`, :func:`simulate_gossip`) or deployed: the server side with :func:`serve`, a site
with :func:`connect`. The command line is a thin shell over these; a notebook can do whatever a command does."""

from fedloom.app.gossip import simulate_gossip
from fedloom.app.job import Job, load_job
from fedloom.app.run import Run
from fedloom.app.simulation import simulate

__all__ = ["Job", "Run", "load_job", "simulate", "simulate_gossip"]
