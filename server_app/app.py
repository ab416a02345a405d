"""ServerApp: the one-shot protocol over Flower's Grid.

``train`` (phase 1) goes to every node once; the configured server method runs on the
replies (a one-shot method through its Flower strategy object, built from the run config:
:mod:`fedbicross_flwr.strategies`); ``train.personalize`` (phase 3) sends each node the model
chosen for ITS partition. The messages are in
:class:`fedbicross_flwr.transports.grid_transport.GridTransport`, the partition-to-node binding
and the reading and refusal of replies in :mod:`fedbicross_flwr.transports.replies` (as a
strategy's); the protocol is :func:`fedbicross_flwr.server.run_server`.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.exit import add_exit_handler

from fedbicross_flwr.config.run_config import RunConfig
from fedbicross_flwr.server import log_stopped_runs, run_methods, run_server
from fedbicross_flwr.transports.grid_transport import GridTransport

app = ServerApp()


@app.main()  # type: ignore[arg-type]
def main(grid: Grid, context: Context) -> Path:
    """Validate the run config, then run the three phases; returns the run folder.

    With ``methods``, phase 1 runs once and every listed method runs phases 2-3 on the same
    uploads; the returned folder is then the comparison folder (table and summary picture),
    or the method's folder when only one is listed.
    """
    cfg = RunConfig.from_run_config(context.run_config)
    # stopped by a signal: the run folder's log says what is kept and how to resume
    add_exit_handler(log_stopped_runs, run_before_force_exit=True)
    if cfg.methods:
        run_dirs = run_methods(cfg, GridTransport(grid))
        return run_dirs.get("comparison", run_dirs[cfg.method_list[0]])
    return run_server(cfg, GridTransport(grid))
