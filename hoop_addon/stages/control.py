"""The control API's addon: option `hoop_control`, started and stopped with the proxy."""

from __future__ import annotations

from mitmproxy import ctx

from hoop_addon.control.server import ControlServer, parse_listen
from hoop_addon.evidence.audit_log import parse_worker
from hoop_addon.stages import Stage, logger


class Control(Stage):
    """Owns option `hoop_control` (`HOST:PORT` on loopback; empty: no control API).
    Other stages add handlers to `server` when they are constructed; the server starts
    in `running` (a port it cannot bind stops start-up) and stops in `done`.

    Worker I of N (`hoop_worker`, see the Audit stage) shares the port with the other
    workers (`SO_REUSEPORT`: approvals live in the shared store, so any worker answers
    for all) and also listens on its own port, PORT + 1 + I (`worker_port`): its
    `/metrics` and `/healthz`, one scrape target per worker."""

    def __init__(self) -> None:
        self.server = ControlServer()
        self.listen: tuple[str, int] | None = None
        self.worker_port: int | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "hoop_control", str, "127.0.0.1:8081",
            "Control API (approvals) HOST:PORT on loopback; empty disables it.",
        )

    def configure(self, updated: set[str]) -> None:
        if "hoop_control" not in updated:
            return
        if self.started:
            self.config_error("hoop: hoop_control cannot change while the gateway runs")
            return
        try:
            self.listen = parse_listen(ctx.options.hoop_control) if ctx.options.hoop_control else None
        except ValueError as exc:
            self.config_error(f"hoop: hoop_control: {exc}")

    @property
    def url(self) -> str | None:
        """The API's base URL, or None when it is off."""
        return f"http://{self.listen[0]}:{self.listen[1]}" if self.listen else None

    def running(self) -> None:
        if self.listen and self.server.server is None:
            worker = parse_worker(ctx.options.hoop_worker)  # validated by the Audit stage's configure
            self.worker_port = self.listen[1] + 1 + worker[0] if worker else None
            try:
                self.server.start(*self.listen, worker_port=self.worker_port)
                logger.info(f"hoop: control API on {self.url}" + (f" (this worker's: port {self.worker_port})"
                                                                  if self.worker_port else ""))
            except OSError as exc:
                logger.error(f"hoop: hoop_control: cannot listen on {self.url}: {exc.strerror}")
        super().running()

    def done(self) -> None:
        self.server.stop()
