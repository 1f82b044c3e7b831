"""A simulated Plivo caller for tests and benchmarks: ``caller.run_call(CallerOptions, [Say, Pause,
Dtmf, ...]) -> report.CallResult``; ``cli`` is ``scripts/simulate_call``; ``probe`` replays Plivo's
second websocket for an ended call."""
