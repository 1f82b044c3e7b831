"""One live call, audio in to audio out, with no HTTP inside.

``turns`` (VAD probabilities -> speech/turn events, utterance buffer), ``chunker`` (streamed text ->
speakable clauses), ``playout`` (paced 20 ms frames, pause/resume/clear, heard accounting),
``reply`` (one agent reply and its voice), ``session`` (the per-call orchestrator and barge-in),
``records`` (what a call reports), ``manager`` (the service owning every live call), ``clock``.
"""
