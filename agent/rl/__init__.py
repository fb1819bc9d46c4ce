"""The RAP-style DQN planner: `policy` serves a trained network (what the
operator loads), `training` trains one (what `elasticfleet agent train`
runs). Training builds on serving, never the reverse."""
