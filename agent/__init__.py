"""The agent: block importance profiling and pruning policies (not built yet)."""
