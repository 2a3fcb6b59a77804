"""
metrics.py against hand computations: the ranking metrics train.py logs and eval.py reports, on
tiny batches whose numbers come out round, with ties; the console line and the tracker flag.

    python -m pytest test_metrics.py -q
"""

import math
import sys

import pytest
import torch

import metrics
from metrics import MetricsLog, hms, ranking_metrics, ranking_sums


def test_ranking_metrics_hand_example_with_ties():
    """Group 1: scores [3, 3, 1], log p [-1, -2, -3]: chosen = both tied-best (log p -1, -2), rejected
    = the third (-3). Group 2: scores [2, 1, pad], log p [-0.5, -0.25]: chosen first, rejected second.
    Group 3: scores [4, 4] (no preference): not counted anywhere.
      p_chosen       = mean over groups of the mean p of its chosen = ((e^-1 + e^-2)/2 + e^-0.5) / 2
      p_rejected     = mean over rejected responses = (e^-3 + e^-0.25) / 2
      logps_chosen   = ((-1 - 2)/2 + -0.5) / 2 = -1
      logps_rejected = (-3 - 0.25) / 2 = -1.625
      reward_margin  = mean over groups of (chosen mean - rejected mean) = ((-1.5 + 3) + (-0.5 + 0.25)) / 2 = 0.625
      pair_acc       = pairs (0,2), (1,2) correct; (0,1) of group 2 wrong: 2 / 3
      top1_acc       = group 1: highest p is response 0, a chosen; group 2: response 1 is not: 1 / 2"""
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.25, 0.0], [-1.0, -2.0, 0.0]])
    scores = torch.tensor([[3.0, 3.0, 1.0], [2.0, 1.0, 0.0], [4.0, 4.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False], [True, True, False]])
    m = ranking_metrics(ranking_sums(logps, scores, mask))
    e = math.exp
    assert m["p_chosen"] == pytest.approx(((e(-1) + e(-2)) / 2 + e(-0.5)) / 2, rel=1e-6)
    assert m["p_rejected"] == pytest.approx((e(-3) + e(-0.25)) / 2, rel=1e-6)
    assert m["margin"] == pytest.approx(m["p_chosen"] - m["p_rejected"], rel=1e-6)
    assert m["logps_chosen"] == pytest.approx(-1.0, rel=1e-6)
    assert m["logps_rejected"] == pytest.approx(-1.625, rel=1e-6)
    assert m["reward_margin"] == pytest.approx(0.625, rel=1e-6)
    assert m["pair_acc"] == pytest.approx(2 / 3, rel=1e-6)
    assert m["top1_acc"] == pytest.approx(0.5, rel=1e-6)


def test_sums_add_over_micro_batches():
    """Metrics of a batch equal those of its two halves' summed sums (how train.py accumulates)."""
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(6, 4, generator=g) * 3
    scores = torch.randint(1, 4, (6, 4), generator=g).float()  # small range: many ties
    mask = torch.rand(6, 4, generator=g) > 0.2
    whole = ranking_metrics(ranking_sums(logps, scores, mask))
    halves = [
        a + b
        for a, b in zip(ranking_sums(logps[:3], scores[:3], mask[:3]), ranking_sums(logps[3:], scores[3:], mask[3:]))
    ]
    assert ranking_metrics(halves) == pytest.approx(whole, rel=1e-6)


def test_console_line_and_file(tmp_path, capsys):
    """A record goes to metrics.jsonl as is, and to the console as one compact line with the step
    out of the total and the ETA as h:mm:ss."""
    log = MetricsLog(tmp_path, total_steps=250)
    log.write({"split": "train", "step": 10, "loss": 0.5, "pair_acc": 0.75, "elapsed_s": 65.0, "eta_s": 5234.1})
    log.close()
    line = capsys.readouterr().out.strip()
    assert line == "train step 10/250 | loss 0.5 | pair_acc 0.75 | elapsed 0:01:05 | eta 1:27:14"
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
    assert hms(3600 * 26 + 1) == "26:00:01"


@pytest.mark.parametrize("tracker, package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_tracker_without_its_package_is_one_line(monkeypatch, tracker, package):
    """--report_to names the pip package to install when the tracker cannot be imported."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if absent
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(SystemExit, match=f"--report_to {tracker} needs the {package} package: pip install {package}"):
        MetricsLog.check_tracker(tracker)


def test_tensorboard_receives_the_scalars(tmp_path, monkeypatch):
    """With a tracker, every number of a record is sent under split/name at its step."""
    sent = []

    class Writer:  # stands in for torch.utils.tensorboard.SummaryWriter
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, name, value, step):
            sent.append((name, value, step))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(metrics.MetricsLog, "check_tracker", staticmethod(lambda name: Writer))
    log = MetricsLog(tmp_path, total_steps=5, report_to="tensorboard")
    log.write({"split": "eval", "step": 3, "loss": 0.25, "pair_acc": 1.0})
    log.close()
    assert sent == [("eval/loss", 0.25, 3), ("eval/pair_acc", 1.0, 3)]
