"""The on-disk trace format: manifest, writer, reader (docs/trace-format.md)."""

from moeload.trace.manifest import SCHEMA_VERSION, Manifest, read_manifest
from moeload.trace.reader import Trace, open_trace
from moeload.trace.writer import TraceWriter

__all__ = ["SCHEMA_VERSION", "Manifest", "Trace", "TraceWriter", "open_trace", "read_manifest"]
