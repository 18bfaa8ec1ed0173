"""`mugcp sweep` runs datasets x methods x seeds, skips finished work on restart, and writes the report."""

from __future__ import annotations

from conftest import cli
from mugcp.world.synth import write_synthetic_dtd


def test_sweep_is_one_restartable_command(tmp_path, tiny_clip):
    write_synthetic_dtd(tmp_path / "data", per_class=4, size=32)
    args = ["sweep", "--datasets", "dtd", "--methods", "zeroshot,coop", "--seeds", "1,2", "--shots", "2",
            "--root", tmp_path / "data", "--output", tmp_path / "runs", "--clip", tiny_clip[0], "--pretrained",
            tiny_clip[1], "--set", "optim.epochs=1", "--workers", "0"]
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| dtd | coop | 2 |" in r.stdout and "| dtd | zeroshot | 1 |" in r.stdout
    assert "dtd coop seed 3: missing" in r.stdout  # seeds not asked for are listed, not hidden
    report = (tmp_path / "runs" / "report.md").read_text()
    assert "| dtd | coop | 2 |" in report and (tmp_path / "runs" / "report.png").is_file()
    again = cli(*args)
    assert again.returncode == 0 and "trained coop" not in again.stderr and "accuracy" not in again.stderr
