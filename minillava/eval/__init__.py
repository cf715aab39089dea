"""Benchmarks: `python -m minillava.eval {scienceqa,llava-bench,toy} --help`.

  scienceqa.py    ScienceQA multiple choice, the LLaVA-1.5 prompt and answer extraction (paper section 5.2)
  llava_bench.py  LLaVA-Bench: free-form answers rated against GPT-4's by a judge model (paper section 5.1)
  toy.py          the toy world's held-out short-answer questions, per category
  common.py       what they share: model flags, batched greedy answering with a resumable
                  answers.jsonl, results.json + table.md
"""
