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
    stopped, resumed, broken = stop_and_resume(played, times, onset_ms=0.0)
    assert stopped == times[8] and resumed == times[11] and broken == 0  # the one-tick underrun is no stop
    played, times = _ticks("#####")
    assert stop_and_resume(played, times, onset_ms=0.0) == (None, None, 0)


def test_a_stop_broken_while_the_caller_talks_is_counted_and_the_lasting_one_timed() -> None:
    # Paused at 2 (a breath before the words), played on at 6, stopped for good at 9, answered at 20.
    played, times = _ticks("##....###" + "." * 11 + "###")
    stopped, resumed, broken = stop_and_resume(played, times, onset_ms=0.0, until_ms=times[15])
    assert (stopped, resumed, broken) == (times[9], times[20], 1)
    # Without the caller's end, the first stop counts, as before.
    assert stop_and_resume(played, times, onset_ms=0.0) == (times[2], times[6], 0)
    # A caller still talking when the agent resumed for the last time: no lasting stop.
    played, times = _ticks("##....####")
    assert stop_and_resume(played, times, onset_ms=0.0, until_ms=times[9]) == (None, None, 1)
