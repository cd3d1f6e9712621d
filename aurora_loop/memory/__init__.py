"""What a train step needs in memory, per device, from the compiled program.

:mod:`~aurora_loop.memory.estimate` compiles a step on abstract arguments and reads XLA's
``memory_analysis()``; :mod:`~aurora_loop.memory.buffers` reads XLA's buffer assignment back
to say which part of the model (and which pass) the peak of the temporaries belongs to.
"""

from aurora_loop.memory.buffers import Breakdown, format_breakdown, format_peaks, read_dump
from aurora_loop.memory.estimate import CARDS, MemoryEstimate, estimate, per_device_bytes

__all__ = ["CARDS", "Breakdown", "MemoryEstimate", "estimate", "format_breakdown", "format_peaks", "per_device_bytes", "read_dump"]
