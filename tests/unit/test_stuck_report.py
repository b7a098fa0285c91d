"""The watchdog's report names what a stop that overran its limit was waiting for."""

from __future__ import annotations

import asyncio
import threading

from ipaas.lifecycle import stuck_report


async def test_the_report_names_the_waiting_task_and_the_blocked_thread() -> None:
    release = threading.Event()

    def held_by_a_driver() -> None:
        release.wait(10)

    async def waits_for_a_dead_database() -> None:
        await asyncio.Event().wait()

    worker = threading.Thread(target=held_by_a_driver, name="db-writer")
    worker.start()
    task = asyncio.create_task(waits_for_a_dead_database(), name="outcome-writer")
    await asyncio.sleep(0)
    try:
        # Taken from another thread while the loop runs, as the watchdog's timer takes it.
        report = await asyncio.to_thread(stuck_report, asyncio.get_running_loop())
    finally:
        release.set()
        task.cancel()
        worker.join()
    (thread,) = [line for line in report["threads"] if line.startswith("db-writer:")]
    assert "held_by_a_driver" in thread
    (waiting,) = [line for line in report["tasks"] if line.startswith("outcome-writer:")]
    assert "waits_for_a_dead_database" in waiting
    assert not any(line.startswith("asyncio_") and "stuck_report" in line for line in report["threads"])


def test_without_a_loop_only_threads_are_reported() -> None:
    reports = []
    watchdog = threading.Thread(target=lambda: reports.append(stuck_report(None)))
    watchdog.start()
    watchdog.join()
    (report,) = reports
    assert report["tasks"] == []
    assert any(line.startswith("MainThread:") and "test_without_a_loop" in line for line in report["threads"])
