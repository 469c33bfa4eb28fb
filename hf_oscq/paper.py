"""The paper hf_oscq implements, as the model cards cite it."""

PAPER_URL = "https://arxiv.org/abs/2502.00490"
PAPER = (
    f"[*Oscillations Make Neural Networks Robust to Quantization*]({PAPER_URL}) (Wenshøj, Pepin, Selvan; TMLR 2025)"
)
CITATION = """@article{wenshoj2025oscillations,
  title   = {Oscillations Make Neural Networks Robust to Quantization},
  author  = {Wensh{\\o}j, Jonathan and Pepin, Bob and Selvan, Raghavendra},
  journal = {Transactions on Machine Learning Research},
  year    = {2025},
  url     = {https://arxiv.org/abs/2502.00490}
}"""
