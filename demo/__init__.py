"""The local fleet demo (`elasticfleet fleet demo`, the project's main job):
real workers on simulated devices, planned by the operator's real control
loop through a squeeze, relief and a crash. It sits above the operator and
the worker and nothing but the command line imports it."""
