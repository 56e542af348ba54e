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
