"""benchmarks/video_fullsize.py on the tiny architectures (the same code path as the full-size GPU run)."""

import json


def test_tiny_run_counts_every_call_and_reports(benchmark_script, tmp_path):
    bench = benchmark_script("video_fullsize")
    out = bench.RESULTS / "video_fullsize.json"
    argv = ["run", "--arch", "tiny", "--problems", "A", "--size", "32", "32", "--warmup_size", "32", "32"]
    bench.main([*argv, "--device", "cpu", "--out", str(out)])
    row = json.loads(out.read_text())["problems"]["A"]
    # schedule A: 5 video rows and 4 image sweeps of 25 frames in chunks of 8 (4 UNet calls per sweep)
    assert (row["nfe_video"], row["nfe_image"], row["calls"]) == (5, 4, 5 + 4 * 25)
    assert row["calls_per_run"] == {"video_network": 5, "image_network": 16, "video_vae": 10, "image_vae": 32}
    parts = row["video_network"] + row["image_network"] + row["video_vae"] + row["image_vae"]
    assert abs(row["network_and_vae_s"] - parts) < 1e-9 and row["overhead"] == row["wall_s"] / parts > 1
    assert (row["frames"], row["size"]) == (25, [32, 32])
    text = bench.report()
    assert "| A | 25 × 32 × 32 | 5 + 4 | 105 |" in text
    assert text in bench.README.read_text()
