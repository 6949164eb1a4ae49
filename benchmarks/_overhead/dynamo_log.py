"""Dynamo's counters and recompile messages of one process, collected for the result."""

from __future__ import annotations

import logging

import torch


class DynamoLog:
    """Dynamo's counters and recompile messages of this process (one arm per process)."""

    def __init__(self) -> None:
        self.recompiles: list[str] = []
        torch._logging.set_logs(recompiles=True)
        log = logging.getLogger("torch._dynamo.guards.__recompiles")
        log.propagate = False  # collected here, not printed
        self.limits: list[str] = []  # "hit config.recompile_limit": that frame runs eager from then on
        self._handlers = [(log, _Collect(self.recompiles)),
                          (logging.getLogger("torch._dynamo.convert_frame"), _Collect(self.limits, "torch._dynamo hit config."))]
        for logger, handler in self._handlers:
            logger.addHandler(handler)
        self.marks: dict[str, dict] = {}

    def detach(self) -> None:
        """Stop collecting; dynamo's logging as it was (for a DynamoLog in a process that goes on)."""
        for logger, handler in self._handlers:
            logger.removeHandler(handler)
        self._handlers[0][0].propagate = True
        torch._logging.set_logs()

    def compiles(self) -> int:
        """Graphs compiled plus recompiles so far (a step that changes it compiled something)."""
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"]) + len(self.recompiles)

    def mark(self, name: str) -> None:
        from torch._dynamo.utils import counters

        self.marks[name] = {
            "graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "recompiles": len(self.recompiles),
            "recompile_limit_hits": len(self.limits),
        }

    def report(self) -> dict:
        from torch._dynamo.utils import counters

        reasons = {k.split("\n")[0]: int(v) for k, v in counters["graph_break"].items()}
        w = self.marks.get("after_warmup", {}).get("recompiles", 0)
        return {"at": self.marks, "graph_break_reasons": reasons, "recompile_limit_hits": [brief(m) for m in self.limits],
                "recompile_reasons": {"warmup": [brief(r) for r in self.recompiles[:w][:8]],
                                      "measured": [brief(r) for r in self.recompiles[w:][:8]]}}


def brief(message: str) -> str:
    """A dynamo recompile message -> "function file:line: first failed guard"."""
    lines = [ln.strip() for ln in message.splitlines()]
    if lines[0].startswith("torch._dynamo hit config."):  # recompile limit: "function: ...", "last reason: ..."
        return " ".join(lines[:3])[:300]
    where = lines[0].removeprefix("Recompiling function ")
    guard = next((ln[2:] for ln in lines[1:] if ln.startswith("- ")), "")
    return f"{where}: {guard}"[:300]


class _Collect(logging.Handler):
    def __init__(self, into: list[str], prefix: str = "") -> None:
        super().__init__(logging.DEBUG)
        self.into, self.prefix = into, prefix

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(self.prefix):
            self.into.append(message)
