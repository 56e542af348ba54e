from pipeline.progress import Progress, final_report


def test_progress_line_reports_counts_rate_and_drops():
    lines = []
    p = Progress(size=100, already=10, interval=0.0, out=lines.append)
    for i in range(5):
        p.update({"status": "ok" if i % 2 else "segment:no_box"}, written=10 + i // 2)
    assert len(lines) == 5
    assert lines[-1].startswith("[pipeline] 12/100 triplets (12.0%)")
    assert "candidates this run 5" in lines[-1] and "segment:no_box=3" in lines[-1]


def test_final_report_names_stages_and_why_it_stopped():
    index = {"complete": False, "status": "the caption plan ran out", "totals":
             {"samples": 3, "shards": 1, "bytes": 2_000_000, "candidates_consumed": 9},
             "drops": {"captions": {"prose": 2}, "segment": {"no_box": 6}}}
    text = final_report(index, 10, "s3://b/ds", 75.0)
    assert text.splitlines()[0] == ("INCOMPLETE: 3/10 triplets in 1 shards, 2.0 MB, 9 candidates consumed, "
                                    "1m15s this run")
    assert "captions drops: prose=2" in text and "segment drops: no_box=6" in text
    assert "why: the caption plan ran out" in text


def test_eta_settles_on_the_steady_rate_not_the_start_up():
    """Ten minutes of model loading, then 2 triplets/s: the ETA is the time the rest really takes."""
    now = [0.0]
    p = Progress(size=10_000, already=0, interval=1e9, out=lambda s: None, window=300, clock=lambda: now[0])
    now[0] = 600.0  # start-up: nothing written yet
    p.update({"status": "ok"}, written=0)
    for i in range(1, 2001):  # 1000 s at 2/s
        now[0] = 600.0 + i / 2
        p.update({"status": "ok"}, written=i)
    assert abs(p.rate() - 2.0) < 1e-6
    assert "ETA 1h06m" in p.line()  # 8000 left at 2/s = 4000 s; a start-up-inclusive rate would say 1h40m
    now[0] += 60  # a stall shows in the rate, bounded by the window
    p.update({"status": "segment:no_box"}, written=2000)
    assert 1.5 < p.rate() < 2.0


def test_surplus_captions_are_not_reported_as_a_loss():
    index = {"complete": True, "status": "complete", "totals": {"samples": 3, "shards": 1, "bytes": 1,
             "candidates_consumed": 3}, "drops": {"dedup": {"exact": 2, "surplus": 14}}}
    text = final_report(index, 3, "/d", 1.0)
    assert "unused (plan already full)=14" in text and "exact=2" in text and "surplus=" not in text


def test_the_drop_guard_stops_a_run_whose_drops_are_a_breakage_not_data():
    import pytest

    from pipeline.progress import DropGuard, DropRateExceeded

    guard = DropGuard(window=10, max_rate=0.5)
    for i in range(100):  # a steady 40% of one reason is data: the run goes on
        guard.update("segment:no_box" if i % 5 < 2 else "ok", "no box above the threshold")
    for _ in range(5):  # now every candidate fails the same way
        guard.update("targets:error", "RuntimeError: NaN in the latents")
    with pytest.raises(DropRateExceeded, match=r"targets:error dropped 6 of the last 10 candidates \(60%") as e:
        guard.update("targets:error", "RuntimeError: NaN in the latents")
    assert "NaN in the latents" in str(e.value) and "--set max_drop_rate" in str(e.value)
