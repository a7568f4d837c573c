"""Attribution graphs on a local replacement model (circuit-tracer's method, DESIGN.md §3)."""
