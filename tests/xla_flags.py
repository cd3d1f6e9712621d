"""XLA flags for the test suite: XLA:CPU's quick compilation.

The tests check behaviour, not speed, and most of their time is compilation: level-0 backend
optimisation and no expensive LLVM passes cut it by about 40% (AuroraSmall's train step:
17 s -> 12 s of compile). Numerics stay within every test's tolerance. One Eigen thread keeps
timings steadier on the 2-core CI machine.
"""

FAST_COMPILE = "--xla_cpu_multi_thread_eigen=false --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
