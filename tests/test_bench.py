"""The benchmark runs end to end (--quick: tiny config, 2 repeats). It proves the script works and
both implementations produce numbers; the real figures come from the full mode (see README)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_reports_every_metric_for_both_implementations(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "minillava.bench", "--quick", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["size"] == "tiny" and result["repeats"] == 2
    for impl in ("minillava", "transformers"):
        metrics = result["results"][impl]
        assert set(metrics) >= {"train_tok_s", "prefill_ms", "decode_b1_tok_s", "decode_b8_tok_s", "peak_mb"}
        assert all(v > 0 for v in metrics.values()), metrics
    assert result["results"]["minillava"]["decode_b1_floor_tok_s"] > 0 and result["results"]["minillava"]["decode_b8_floor_tok_s"] > 0
    table = run.stdout.splitlines()
    for label in ("train tokens/s", "prefill ms", "decode tokens/s, batch 1", "decode tokens/s, batch 8", "peak memory MB"):
        assert any(line.startswith(f"| {label}") and line.rstrip().endswith("x |") for line in table), label
    assert any(line.startswith("decode bound:") for line in table)
