"""Running a plan: the engine, its compute side, threads, progress and signal handling."""
