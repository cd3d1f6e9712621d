"""Where a compiled program's temporary memory goes, read back from XLA's own dumps.

XLA writes, for a compiled module (``--xla_dump_to``), its buffer assignment (every value
and the allocation it lives in), the live range of every value over the scheduled
instruction sequence, and the optimised HLO with each instruction's ``op_name``: the JAX
name stack (``jit(train_step)/transpose(jvp(AuroraModule))/backbone/encoder_layers_0/...``).
:func:`read_dump` puts the three together: the bytes of the temporary allocation that are
live at every point of the schedule, the point where they peak, and the values live there,
each labelled with the part of the model (the Flax module path) and the phase (forward,
backward, optimizer) of the instruction that made it.

The temporary allocation is what ``compiled.memory_analysis().temp_size_in_bytes`` reports;
its size is the packed peak of these live ranges, so it is at least the largest live sum
(the difference is XLA's fragmentation).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from collections import defaultdict
from collections.abc import Iterable

_ALLOCATION = re.compile(r"^allocation (\d+): size (\d+), (.*)$")
_VALUE = re.compile(r"^ value: <\d+ (\S+) @[\d,]*> \(size=(\d+),offset=(\d+)\): (\S+)")
_RANGE = re.compile(r"^\s+(\S+?)\{[\d,]*\}:(\d+)-(\d+)$")
_SEQUENCE = re.compile(r"^\s+(\d+):(\S+)$")
_PEAK = re.compile(r"Live ranges at (\d+) \(peak\)")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"")
_ANY_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+) = ")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+) \(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OPERANDS = re.compile(r"%([\w.\-]+)")
# Function transformations around module names in a name stack: jvp(X), transpose(jvp(X)), ...
_WRAPPER = re.compile(r"^(?:jvp|transpose|vmap|remat|checkpoint|pjit|jit|custom_vjp_call|custom_jvp_call|vjp|cond|while|scan|body|branch_\d+)\((.*)\)$")
CONSTANT = "constants expanded by XLA"
COPIED_ARGUMENT = "copies of arguments"
_NOISE = {"", "jit(train_step)", "train_step", "AuroraModule", "while", "body", "cond", "closed_call", "checkpoint",
          "rematted_computation", "remat"}


@dataclasses.dataclass(frozen=True)
class Value:
    """One buffer of the temporary allocation: its HLO name, size (bytes), shape (HLO text),
    live range (indices into the schedule, inclusive) and the ``op_name`` that made it."""

    name: str
    size: int
    shape: str
    start: int
    end: int
    op_name: str


@dataclasses.dataclass
class Breakdown:
    """The temporary memory of one compiled module.

    ``temp_bytes``: the temporary allocation's size; ``peak_live_bytes``: the largest sum of
    live temporaries over the schedule, at position ``peak_index`` (instruction
    ``peak_instruction``, whose ``op_name`` is ``peak_op_name``); ``values``: every
    temporary; ``live``: those live at the peak.
    """

    temp_bytes: int
    peak_live_bytes: int
    peak_index: int
    peak_instruction: str
    peak_op_name: str
    values: list[Value]
    live: list[Value]
    param_shapes: frozenset[str]
    timeline: list[int]
    sequence: list[str] = dataclasses.field(default_factory=list)
    op_names: dict[str, str] = dataclasses.field(default_factory=dict)

    def by_part(self, depth: int = 2, separate_gradients: bool = True) -> list[tuple[str, int]]:
        """Live bytes at the peak grouped by :func:`label` (largest first)."""
        totals: dict[str, int] = defaultdict(int)
        for value in self.live:
            totals[self.label(value, depth, separate_gradients)] += value.size
        return sorted(totals.items(), key=lambda kv: -kv[1])

    def label(self, value: Value, depth: int = 2, separate_gradients: bool = True) -> str:
        """``phase: part`` of a value; parameter-shaped values made in the backward pass
        are ``gradients`` (the gradient of every parameter is alive until the update)."""
        for kind in (CONSTANT, COPIED_ARGUMENT):
            if value.op_name.startswith(kind + "/"):
                return kind
        if value.op_name.startswith(("state.", "state[", "batch.")):  # an argument's own op_name: its path
            return COPIED_ARGUMENT
        phase = phase_of(value.op_name)
        if separate_gradients and phase == "backward" and _bare_shape(value.shape) in self.param_shapes:
            return "gradients (parameter-shaped)"
        part = part_of(value.op_name, depth)
        return f"{phase}: {part}" if part else phase

    def peaks_while_running(self, depth: int = 2) -> list[tuple[str, int]]:
        """For every ``phase: part`` that runs instructions, the most temporary bytes live
        while one of its instructions runs (largest first): where each pass of each part
        would peak (the loss, the optimizer update and the gradients' reductions included)."""
        peaks: dict[str, int] = defaultdict(int)
        for index, name in enumerate(self.sequence):
            if index < len(self.timeline):
                label = _running_label(self.op_names.get(name, ""), depth)
                peaks[label] = max(peaks[label], self.timeline[index])
        return sorted(peaks.items(), key=lambda kv: -kv[1])

    def peak_phase(self, depth: int = 3) -> str:
        """``phase: part`` of the instruction running at the peak."""
        part = part_of(self.peak_op_name, depth)
        return f"{phase_of(self.peak_op_name)}: {part}" if part else phase_of(self.peak_op_name)


def _running_label(op_name: str, depth: int) -> str:
    if not op_name or op_name.startswith((CONSTANT, COPIED_ARGUMENT, "state", "batch")):
        return "(XLA's own: copies, constants, parameters)"
    part = part_of(op_name, depth)
    return f"{phase_of(op_name)}: {part}" if part else phase_of(op_name)


def phase_of(op_name: str) -> str:
    """``backward`` (a transposed op), ``forward`` (under a ``jvp``, not transposed) or
    ``optimizer`` (neither: the update after the gradient)."""
    if "transpose(" in op_name:
        return "backward"
    if "jvp(" in op_name:
        return "forward"
    return "optimizer / other"


def part_of(op_name: str, depth: int = 2) -> str:
    """The module path of an ``op_name``, transformation wrappers removed, its first
    ``depth`` modules: ``.../transpose(jvp(AuroraModule))/backbone/encoder_layers_0/...`` ->
    ``backbone/encoder_layers_0``. The last component (the primitive) is left out."""
    parts = []
    for component in op_name.split("/")[:-1]:
        while (match := _WRAPPER.match(component)) is not None:
            component = match.group(1)
        if component in _NOISE or component.startswith("jit(") or "(" in component:
            continue
        if parts and parts[-1] == component:
            continue
        parts.append(component)
    return "/".join(parts[:depth])


def _bare_shape(shape: str) -> str:
    """``f32[1024,4096]{1,0}`` -> ``f32[1024,4096]`` (layout dropped)."""
    return shape.split("{", 1)[0]


def _module_files(dump_dir: str, module: str) -> dict[str, str]:
    pattern = os.path.join(dump_dir, f"*{module}*after_optimizations")
    found = {}
    for suffix in ("-buffer-assignment.txt", "-live-range.txt", ".txt"):
        matches = sorted(glob.glob(pattern + suffix))
        if not matches:
            raise FileNotFoundError(f"no XLA dump {pattern + suffix}: compile with --xla_dump_to={dump_dir}")
        found[suffix] = matches[-1]
    return found


def _read_op_names(hlo_path: str) -> dict[str, str]:
    """Instruction name -> ``op_name``. XLA leaves some instructions without one (fusions it
    formed, copies it inserted): a fusion gets the last ``op_name`` inside the computation
    it calls, any other the ``op_name`` of its first operand that has one, and a copy of an
    argument ``argument <name>``."""
    names: dict[str, str] = {}
    computation_names: dict[str, str] = {}
    unnamed: list[tuple[str, str]] = []  # (instruction, its HLO line)
    computation = None
    with open(hlo_path) as f:
        for line in f:
            header = _COMPUTATION.match(line)
            if header:
                computation = header.group(1)
                continue
            match = _INSTRUCTION.match(line)
            if match:
                names[match.group(1)] = match.group(2)
                if computation is not None:
                    computation_names[computation] = match.group(2)
                continue
            match = _ANY_INSTRUCTION.match(line)
            if match:
                unnamed.append((match.group(1), line))
    for name, line in unnamed:
        called = _CALLS.search(line)
        if called and called.group(1) in computation_names:
            names[name] = computation_names[called.group(1)]
            continue
        operands = _OPERANDS.findall(line.split("=", 1)[1])
        for operand in operands:
            if operand in names:
                names[name] = names[operand]
                break
            if operand.startswith("state_") or operand.startswith("batch"):
                names[name] = f"{COPIED_ARGUMENT}/{operand}/copy"
                break
            if operand.startswith("constant"):
                names[name] = f"{CONSTANT}/{operand}/broadcast"
                break
    return names


def _read_assignment(path: str) -> tuple[int, dict[str, tuple[int, str]], frozenset[str]]:
    """(temp allocation size, temp value name -> (size, shape), shapes of the ``params`` arguments)."""
    temp_size, temps, param_shapes = 0, {}, set()
    kind = None
    with open(path) as f:
        for line in f:
            if line.startswith("allocation "):
                match = _ALLOCATION.match(line)
                kind = None
                if match:
                    rest = match.group(3)
                    if "preallocated-temp" in rest:
                        kind = "temp"
                        temp_size += int(match.group(2))
                    elif rest.startswith("parameter"):
                        kind = "parameter"
                continue
            if kind is None or not line.startswith(" value:"):
                continue
            match = _VALUE.match(line)
            if not match:
                continue
            name, size, _, shape = match.groups()
            if kind == "temp":
                temps[name] = (int(size), shape)
            elif "params" in name:
                param_shapes.add(_bare_shape(shape))
    return temp_size, temps, frozenset(param_shapes)


def _read_live_ranges(path: str) -> tuple[list[str], dict[str, tuple[int, int]], int | None]:
    sequence, ranges, peak = [], {}, None
    section = None
    with open(path) as f:
        for line in f:
            stripped = line.strip()
            if stripped == "InstructionSequence:":
                section = "sequence"
                continue
            if stripped == "BufferLiveRange:":
                section = "ranges"
                continue
            match = _PEAK.search(line)
            if match:
                peak = int(match.group(1))
                section = None
                continue
            if section == "sequence":
                match = _SEQUENCE.match(line)
                if match:
                    sequence.append(match.group(2))
            elif section == "ranges":
                match = _RANGE.match(line)
                if match:
                    name, start, end = match.group(1), int(match.group(2)), int(match.group(3))
                    old = ranges.get(name)
                    ranges[name] = (start, end) if old is None else (min(old[0], start), max(old[1], end))
    return sequence, ranges, peak


def read_dump(dump_dir: str, module: str = "jit_train_step") -> Breakdown:
    """The :class:`Breakdown` of the newest compiled module named ``module`` in ``dump_dir``."""
    files = _module_files(dump_dir, module)
    temp_size, temps, param_shapes = _read_assignment(files["-buffer-assignment.txt"])
    sequence, ranges, _ = _read_live_ranges(files["-live-range.txt"])
    op_names = _read_op_names(files[".txt"])
    values = []
    for name, (size, shape) in temps.items():
        if name not in ranges:
            continue
        start, end = ranges[name]
        values.append(Value(name, size, shape, start, end, op_names.get(name, "")))
    length = max(len(sequence), max((v.end for v in values), default=0) + 1)
    delta = [0] * (length + 1)
    for v in values:
        delta[v.start] += v.size
        delta[v.end + 1] -= v.size
    timeline, running = [], 0
    for step in range(length):
        running += delta[step]
        timeline.append(running)
    peak_index = max(range(length), key=timeline.__getitem__) if length else 0
    live = [v for v in values if v.start <= peak_index <= v.end]
    instruction = sequence[peak_index] if peak_index < len(sequence) else ""
    return Breakdown(temp_size, timeline[peak_index] if timeline else 0, peak_index, instruction,
                     op_names.get(instruction, ""), values, live, param_shapes, timeline, sequence, op_names)


def format_peaks(breakdown: Breakdown, depth: int = 2, top: int = 12, unit: float = 2**30) -> Iterable[str]:
    """Lines of a report: the most temporary bytes live while each part runs."""
    yield "temporaries live while each part runs, at most:"
    for name, size in breakdown.peaks_while_running(depth)[:top]:
        yield f"  {size / unit:8.3f} GiB  {name}"


def format_breakdown(breakdown: Breakdown, depth: int = 2, top: int = 12, unit: float = 2**30) -> Iterable[str]:
    """Lines of a report: the sizes, the instruction at the peak and the live bytes by part."""
    gib = lambda n: f"{n / unit:8.3f}"  # noqa: E731
    yield (f"temporary allocation {gib(breakdown.temp_bytes).strip()} GiB; live at its peak "
           f"{gib(breakdown.peak_live_bytes).strip()} GiB, in {breakdown.peak_phase()} ({breakdown.peak_instruction})")
    rows = breakdown.by_part(depth)
    for name, size in rows[:top]:
        yield f"  {gib(size)} GiB  {100 * size / max(breakdown.peak_live_bytes, 1):5.1f}%  {name}"
    rest = sum(size for _, size in rows[top:])
    if rest:
        yield f"  {gib(rest)} GiB  {100 * rest / max(breakdown.peak_live_bytes, 1):5.1f}%  ({len(rows) - top} more parts)"
