"""Where a compiled program's time goes: a jax.profiler trace of a few runs, grouped by the source line of the
JAX operation each device kernel came from.

    summary = profile(run, compiled.as_text(), runs=3)

Every trace event that carries an `hlo_op` stat is one executed piece of the program (a GPU kernel, or a CPU
thunk); its HLO instruction's metadata in the compiled text names the JAX primitive and the source line that
made it. `busy_ms` is the union of those events' intervals per run and `wall_ms` the time of the whole trace
per run: a busy time far below the wall time means the device waits on the host (dispatch, launches). The
groups are per run, largest first.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{([^}]*)\}")
_FIELD = re.compile(r'(\w+)=(?:"([^"]*)"|(\S+))')
_TABLE_ROW = re.compile(r'^(\d+) (?:"([^"]*)"|\{([^}]*)\})$')


def _tables(hlo_text: str) -> dict[str, dict[str, Any]]:
    """The FileNames, FunctionNames, FileLocations and StackFrames tables of a compiled HLO text (newer XLA names
    an op's source by stack_frame_id through them; older XLA writes source_file and source_line in place)."""
    tables, current = {}, None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line, {})
        elif current is not None and (row := _TABLE_ROW.match(line)):
            current[row.group(1)] = row.group(2) if row.group(2) is not None else dict(
                (key, quoted or bare) for key, quoted, bare in _FIELD.findall(row.group(3)))
        elif not line.strip() or line.startswith("%") or line.startswith("ENTRY"):
            current = None
    return tables


def source_labels(hlo_text: str) -> dict[str, str]:
    """HLO instruction name → 'file.py:line primitive' from its metadata (the primitive alone without a line)."""
    tables = _tables(hlo_text)
    files, locations, frames = (tables.get(name, {}) for name in ("FileNames", "FileLocations", "StackFrames"))
    labels = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        fields = {key: quoted or bare for key, quoted, bare in _FIELD.findall(match.group(2))}
        primitive = fields.get("op_name", "").rsplit("/", 1)[-1]
        where = ""
        if "source_file" in fields:
            where = f"{Path(fields['source_file']).name}:{fields.get('source_line', '?')} "
        elif (frame := frames.get(fields.get("stack_frame_id", ""))) and (
                location := locations.get(frame.get("file_location_id", ""))):
            where = f"{Path(files.get(location.get('file_name_id', ''), '?')).name}:{location.get('line', '?')} "
        labels[match.group(1)] = (where + primitive).strip() or match.group(1)
    return labels


def union_ns(intervals: list[tuple[int, int]]) -> int:
    """Total length of the union of [start, end) intervals."""
    total, reach = 0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total, reach = total + end - start, end
        elif end > reach:
            total, reach = total + end - reach, end
    return total


def profile(run: Callable[[], Any], hlo_text: str, *, runs: int, top: int = 15) -> dict:
    """Trace `runs` calls of run() (each blocks until done) → {"wall_ms", "busy_ms", "kernels", "groups": [{"op",
    "ms", "count"}]}, times and counts per run. Events are taken from the device planes when there is a GPU."""
    labels = source_labels(hlo_text)
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            start = time.perf_counter()
            for _ in range(runs):
                jax.block_until_ready(run())
            wall = time.perf_counter() - start
        trace = next(Path(folder).rglob("*.xplane.pb"))
        data = jax.profiler.ProfileData.from_file(str(trace))
        gpu = any(plane.name.startswith("/device:GPU") for plane in data.planes)
        intervals, groups = [], defaultdict(lambda: [0, 0])
        for plane in data.planes:
            if gpu and not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                for event in line.events:
                    op = dict(event.stats).get("hlo_op")
                    if op is None:
                        continue
                    intervals.append((event.start_ns, event.end_ns))
                    group = groups[labels.get(op) or re.sub(r"\.\d+$", "", op)]  # unlabelled: by kind
                    group[0] += event.duration_ns
                    group[1] += 1
    ranked = sorted(groups.items(), key=lambda item: -item[1][0])
    return {"wall_ms": 1e3 * wall / runs, "busy_ms": union_ns(intervals) / 1e6 / runs,
            "kernels": len(intervals) / runs,
            "groups": [{"op": op, "ms": ns / 1e6 / runs, "count": count / runs} for op, (ns, count) in ranked[:top]]}
