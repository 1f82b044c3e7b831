from appliance.simulator.report import agent_segments, stop_and_resume


def _ticks(pattern: str) -> tuple[bytearray, list[float]]:
    played = bytearray(1 if c == "#" else 0 for c in pattern)
    return played, [i * 20.0 + 5.0 for i in range(len(played))]


def test_segments_bridge_short_gaps_only() -> None:
    played, times = _ticks("..####.##" + "." * 15 + "###..")
    segments = agent_segments(played, times, merge_gap_ms=100)
    assert [(s.start_ms, s.end_ms) for s in segments] == [(40.0, 180.0), (480.0, 540.0)]
    assert segments[0].wall_start_ms == 45.0 and segments[1].wall_end_ms == 545.0


def test_stop_needs_three_silent_ticks_and_finds_resume() -> None:
    played, times = _ticks("####.###...##")
    stopped, resumed = stop_and_resume(played, times, onset_ms=0.0)
    assert stopped == times[8] and resumed == times[11]  # the one-tick underrun at 4 is not a stop
    played, times = _ticks("#####")
    assert stop_and_resume(played, times, onset_ms=0.0) == (None, None)
