"""Urgent work makes background work wait between steps, but never for long; any engine work is
counted, so the LLM can step with fewer threads beside it."""

import threading
import time

from appliance.engines.priority import CpuPriority


def test_background_work_waits_while_urgent_work_runs() -> None:
    cpu = CpuPriority()
    released = threading.Event()
    waited: list[float] = []

    def urgent_job() -> None:
        with cpu.urgent():
            released.wait(5)

    def background_step() -> None:
        started = time.monotonic()
        cpu.yield_to_urgent(max_wait_s=5.0)
        waited.append(time.monotonic() - started)

    worker = threading.Thread(target=urgent_job)
    worker.start()
    while cpu.urgent_now == 0:
        time.sleep(0.001)
    background = threading.Thread(target=background_step)
    background.start()
    time.sleep(0.2)
    assert not waited  # still waiting for the urgent job
    released.set()
    background.join(5)
    worker.join(5)
    assert waited and 0.15 <= waited[0] < 2.0
    assert cpu.yielded == 1 and cpu.urgent_now == 0


def test_the_wait_is_bounded() -> None:
    cpu = CpuPriority()
    with cpu.urgent():
        started = time.monotonic()
        cpu.yield_to_urgent(max_wait_s=0.05)
        assert time.monotonic() - started < 1.0


def test_no_urgent_work_no_wait() -> None:
    cpu = CpuPriority()
    cpu.yield_to_urgent(max_wait_s=5.0)
    assert cpu.yielded == 0


def test_work_is_counted_while_it_runs_urgent_or_not() -> None:
    cpu = CpuPriority()
    assert cpu.working_now == 0
    with cpu.working():
        assert cpu.working_now == 1 and cpu.urgent_now == 0
        with cpu.urgent():
            assert cpu.working_now == 2 and cpu.urgent_now == 1
        assert cpu.working_now == 1
        started = time.monotonic()
        cpu.yield_to_urgent(max_wait_s=5.0)  # work that can wait makes nobody wait
        assert time.monotonic() - started < 1.0 and cpu.yielded == 0
    assert cpu.working_now == 0


def test_work_that_fails_is_no_longer_counted() -> None:
    cpu = CpuPriority()
    for context in (cpu.working, cpu.urgent):
        try:
            with context():
                raise RuntimeError("decode failed")
        except RuntimeError:
            pass
    assert cpu.working_now == 0 and cpu.urgent_now == 0


def test_the_wait_ends_when_its_condition_holds_and_someone_nudges() -> None:
    cpu = CpuPriority()
    arrived = threading.Event()
    waited: list[float] = []

    def background_step() -> None:
        started = time.monotonic()
        cpu.yield_to_urgent(max_wait_s=5.0, until=arrived.is_set)
        waited.append(time.monotonic() - started)

    with cpu.urgent():
        step = threading.Thread(target=background_step)
        step.start()
        time.sleep(0.1)
        cpu.nudge()  # nothing arrived yet: it goes on waiting
        time.sleep(0.1)
        assert not waited
        arrived.set()
        cpu.nudge()
        step.join(5)
    assert waited and 0.15 <= waited[0] < 1.0
    assert cpu.yielded == 1


def test_no_wait_when_the_condition_already_holds() -> None:
    cpu = CpuPriority()
    with cpu.urgent():
        cpu.yield_to_urgent(max_wait_s=5.0, until=lambda: True)
    assert cpu.yielded == 0


class _Engine:
    def __init__(self) -> None:
        self.told = 0

    def stop_background(self) -> None:
        self.told += 1


def test_engines_are_told_when_urgent_work_starts_and_dropped_engines_are_forgotten() -> None:
    cpu = CpuPriority()
    kept, dropped = _Engine(), _Engine()
    cpu.on_urgent(kept.stop_background)
    cpu.on_urgent(dropped.stop_background)
    del dropped  # the CPU must not keep an engine alive, nor call into one that is gone
    with cpu.urgent():
        assert kept.told == 1
    with cpu.working():  # work that can wait does not stop anyone's background work
        pass
    assert kept.told == 1
    other = _Engine()
    cpu.on_urgent(other.stop_background)  # registering prunes the dead reference
    assert len(cpu._on_urgent) == 2
