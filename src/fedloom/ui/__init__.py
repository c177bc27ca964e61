"""fedloom.ui: the dashboard that ``fedloom ui`` serves (FastAPI and uvicorn, from the ``fedloom[ui]`` extra).

:func:`create_app` builds the web app over a folder of runs; the page and its script are files of this package,
so the dashboard fetches nothing from anywhere else.
"""

from fedloom.ui.app import create_app

__all__ = ["create_app"]
