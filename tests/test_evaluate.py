"""Evaluation through lm-eval: the shipped YAMLs on hand-written outputs and on a tiny model."""
import json

import pytest
import torch
from lm_eval.api.model import LM

from pkt.core import evaluate
from pkt.core.models import load_model, load_tokenizer


class HandWritten(LM):
    """An lm-eval model whose generations and log-likelihoods are written by the test."""

    def __init__(self, answers: dict[str, str], good_letter: dict[str, str] | None = None):
        super().__init__()
        self.answers, self.good_letter = answers, good_letter or {}

    def generate_until(self, requests):
        return [next(a for q, a in self.answers.items() if q in r.args[0]) for r in requests]

    def loglikelihood(self, requests):
        out = []
        for r in requests:
            ctx, cont = r.args
            good = next((L for q, L in self.good_letter.items() if q in ctx), None)
            out.append((0.0 if cont == good else -5.0, cont == good))
        return out

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


def write_task(tmp_path, rows):
    d = tmp_path / "task"
    d.mkdir()
    for split in ("train", "test"):
        (d / f"{split}.jsonl").write_text("\n".join(json.dumps(
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) for q, a in rows) + "\n")
    return d


def run(lm, benchmark, data_dir):
    from lm_eval import simple_evaluate

    out = simple_evaluate(model=lm, tasks=[evaluate.task_config(benchmark, data_dir)], log_samples=True,
                          bootstrap_iters=0, task_manager=evaluate._task_manager(False))
    name = next(iter(out["results"]))
    return evaluate._collect(benchmark, out["results"][name], out["samples"][name], evaluate.BENCHMARKS[benchmark][2])


def test_gsm_answer_extraction_on_hand_written_outputs(tmp_path):
    d = write_task(tmp_path, [("What is 47+38?", "7+8=15, 4+3+1=8. The answer is 85."),
                              ("What is 10+11?", "The answer is 21."),
                              ("What is 20+30?", "The answer is 50."),
                              ("What is 99+99?", "The answer is 198.")])
    lm = HandWritten({"47+38": "7+8=15, 4+3+1=8. The answer is 85.",  # right, with work shown
                      "10+11": "The answer is 12.",  # wrong
                      "20+30": "it is 50 I think",  # right number, but not in the required form
                      "99+99": "the answer is 198."})  # lower-case "the" still counts
    res = run(lm, "gsm", d)
    assert res.per_example["exact_match"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert res.summary["exact_match/strict-match"] == pytest.approx(0.5)
    assert res.summary["exact_match/flexible-extract"] == pytest.approx(0.75)  # last number: 50 counts


def test_mmlu_choice_by_loglikelihood(tmp_path):
    q1 = "What color is the kalomi?\nA. red\nB. blue\nC. green\nD. pink\nAnswer:"
    q2 = "What color is the zuzuzu?\nA. red\nB. blue\nC. green\nD. pink\nAnswer:"
    d = write_task(tmp_path, [(q1, "B"), (q2, "D")])
    res = run(HandWritten({}, {"kalomi": "B", "zuzuzu": "A"}), "mmlu", d)
    assert res.per_example["acc"].tolist() == [1.0, 0.0]


def test_sni_exact_match_and_rouge_l(tmp_path):
    d = write_task(tmp_path, [("Reverse the order of the words: a b c", "c b a"),
                              ("Reverse the order of the words: red blue", "blue red")])
    res = run(HandWritten({"a b c": "c b a", "red blue": "blue"}), "sni", d)
    assert res.per_example["exact_match"].tolist() == [1.0, 0.0]
    assert res.per_example["rougeL"].tolist() == pytest.approx([1.0, 2 / 3])  # P=1, R=1/2


@pytest.mark.parametrize("benchmark,task", [("gsm", "gsm"), ("mmlu", "mmlu"), ("sni", "sni"),
                                            ("answer_nll", "gsm")])
def test_every_yaml_runs_offline_on_a_tiny_model(mini_family, benchmark, task):
    model, tok = load_model(mini_family / "student"), load_tokenizer(mini_family / "student")
    res = evaluate.evaluate(model, tok, benchmark, mini_family / "tasks" / task, limit=4)
    metric = evaluate.primary_metric(benchmark)
    assert metric in res.summary
    assert all(v.numel() == 4 for v in res.per_example.values())
    if benchmark == "answer_nll":
        assert (res.per_example["answer_nll"] > 0).all()


def test_judge_gives_a_tie_when_candidate_equals_reference(mini_family):
    from pkt.core import judge

    model, tok = load_model(mini_family / "teacher"), load_tokenizer(mini_family / "teacher")
    # the same text in both slots makes both orderings the same prompt: one win, one loss
    wins = judge.win_rates(model, tok, ["What is 1+2?"] * 2, ["The answer is 3.", "x"], ["The answer is 3.", "x"])
    assert wins.tolist() == [0.5, 0.5]


def test_winrate_benchmark_runs_offline_with_a_local_judge(mini_family):
    model, tok = load_model(mini_family / "student"), load_tokenizer(mini_family / "student")
    res = evaluate.evaluate(model, tok, "winrate", mini_family / "tasks" / "sni", limit=3,
                            judge=mini_family / "teacher")
    assert res.per_example["winrate"].numel() == 3 and len(res.outputs) == 3
    assert set(res.per_example["winrate"].tolist()) <= {0.0, 0.5, 1.0}
    assert res.summary["winrate"] == pytest.approx(float(res.per_example["winrate"].mean()))
    with pytest.raises(ValueError, match="needs a judge model"):
        evaluate.evaluate(model, tok, "winrate", mini_family / "tasks" / "sni", limit=3)


def test_gsm_reads_answers_in_the_forms_real_solutions_state_them(tmp_path):
    """GSM8K's own "#### 72", a boxed LaTeX answer, an answer with a thousands comma and a dollar sign, and a
    refusal, each generated over several lines (real worked solutions), against GSM8K-format references."""
    rows = [("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
             "How many clips did Natalia sell altogether in April and May?",
             "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
             "altogether in April and May.\n#### 72"),
            ("How much is 617 times 2?", "617 * 2 = <<617*2=1234>>1234\n#### 1234"),
            ("How much did Weng earn?", "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n#### 1,250"),
            ("How many eggs are left?", "16 - 3 - 4 = <<16-3-4=9>>9\n#### 9")]
    d = write_task(tmp_path, rows)
    lm = HandWritten({"48 of her": "In May she sold 48 / 2 = 24 clips.\nAltogether: 48 + 24 = 72.\n#### 72",
                      "617 times": "We multiply:\n\\[617 \\times 2 = 1234\\]\nSo the result is $\\boxed{1,234}$.",
                      "Weng": "She works 50 minutes...\nThe answer is $1,250.00.",
                      "eggs": "I'm sorry, but I can't assist with that."})
    res = run(lm, "gsm", d)
    assert res.per_example["exact_match"].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert res.summary["exact_match/flexible-extract"] == pytest.approx(0.75)  # a refusal has no number


@pytest.mark.parametrize("text,strict,flexible", [
    ("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72", "72"),
    ("so $x = \\boxed{18}$ and we are done", "18", "18"),
    ("The answer is 1,250.", "1250", "1250"),
    ("The final answer is $3.50", "3.5", "3.5"),
    ("#### -7.0", "-7", "-7"),
    ("it is 50 I think", None, "50"),
    ("I'm sorry, but I can't assist with that.", None, None)])
def test_answer_extraction_and_normalisation(text, strict, flexible):
    from pkt.core.answers import extract_answer

    assert extract_answer(text) == strict
    assert extract_answer(text, flexible=True) == flexible


def test_answer_nll_is_reported_per_token_beside_the_sum(mini_family):
    from pkt.core import data

    model, tok = load_model(mini_family / "student"), load_tokenizer(mini_family / "student")
    res = evaluate.evaluate(model, tok, "answer_nll", mini_family / "tasks" / "gsm", limit=3)
    rows = data.read_jsonl(mini_family / "tasks" / "gsm" / "test.jsonl")[:3]
    lengths = [(enc["labels"] != data.IGNORE).sum().item() - 1  # encode adds eos; lm-eval scores the text alone
               for enc in (data.encode(s, tok) for s in data.to_samples(rows, tok))]
    per_token = res.per_example["answer_nll"] / torch.tensor(lengths, dtype=torch.float64)
    assert res.per_example["answer_nll_per_token"].tolist() == pytest.approx(per_token.tolist())
    assert res.summary["answer_nll_per_token"] == pytest.approx(float(per_token.mean()))
    assert res.summary["answer_nll"] == pytest.approx(float(res.per_example["answer_nll"].mean()))
