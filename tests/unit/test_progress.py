"""builder/progress.py off a terminal: plain lines a log keeps (no carriage returns, no escape
codes), a transfer's quarters reported once each even from many threads; on a terminal the build's
own lines stay out of the way and a failed step still raises."""

from __future__ import annotations

import threading

import pytest

from builder.progress import BuildSteps, Transfer


def test_build_steps_off_a_terminal_are_two_plain_lines_each():
    lines: list[str] = []
    with BuildSteps(lines.append, live=False) as steps:
        with steps.step("exporting the fp32 reference", "m:int8"):
            pass
        with pytest.raises(RuntimeError), steps.step("measuring accuracy against fp32", "m:int8"):
            raise RuntimeError("below the floor")
    assert lines[0] == "  exporting the fp32 reference ..."
    assert lines[1].startswith("  exporting the fp32 reference done (") and lines[1].endswith(" s)")
    assert lines[2:] == ["  measuring accuracy against fp32 ..."]        # a failed step never says done


def test_a_transfer_reports_each_quarter_once_from_many_threads():
    lines: list[str] = []
    total = 64 * 1000
    bar = Transfer(total, "push s3://models/prod", live=False, echo=lines.append)
    threads = [threading.Thread(target=lambda: [bar(10) for _ in range(400)]) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    assert [line.split(": ", 1)[1].split(" ", 1)[0] for line in lines] == ["0%", "25%", "50%", "75%", "100%"]
    assert lines[-1] == "push s3://models/prod: 100% (64.0 kB of 64.0 kB)"
    assert not any("\r" in line or "\x1b" in line for line in lines)


def test_an_empty_transfer_says_nothing():
    lines: list[str] = []
    Transfer(0, "pull s3://models/prod", live=False, echo=lines.append).close()
    assert lines == []


def test_live_steps_print_no_plain_lines_and_still_raise():
    lines: list[str] = []
    with BuildSteps(lines.append, live=True) as steps:
        with steps.step("deriving the int8 engine", "m:int8"):
            pass
        with pytest.raises(ValueError), steps.step("writing", "m:int8"):
            raise ValueError("disk full")
    assert lines == []
