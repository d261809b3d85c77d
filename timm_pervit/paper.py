"""Facts of the PerViT paper and its official release, in one place for the model configs, the model card and the demo.

Paper: `Peripheral Vision Transformer` - https://arxiv.org/abs/2206.06801 (Min, Zhao, Luo, Cho; NeurIPS 2022).
"""
from typing import Dict, Tuple

__all__ = ['PAPER_NAME', 'PAPER_ID', 'PAPER_URL', 'OFFICIAL_URL', 'PAPER_RESULTS', 'CITATION', 'TIMM_CITATION']

PAPER_NAME = 'Peripheral Vision Transformer'
PAPER_ID = 'arXiv:2206.06801'
PAPER_URL = 'https://arxiv.org/abs/2206.06801'
OFFICIAL_URL = 'https://github.com/juhongm999/pervit'

#: variant -> (ImageNet-1k top-1 at 224 px, params in M, GFLOPs), as reported in the paper.
PAPER_RESULTS: Dict[str, Tuple[float, float, float]] = {
    'pervit_tiny': (78.8, 7.6, 1.6),
    'pervit_small': (82.1, 21.0, 4.4),
    'pervit_medium': (82.9, 44.0, 9.0),
}

CITATION = """@inproceedings{min2022peripheral,
  title     = {Peripheral Vision Transformer},
  author    = {Min, Juhong and Zhao, Yucheng and Luo, Chong and Cho, Minsu},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2022}
}"""

TIMM_CITATION = """@misc{rw2019timm,
  author       = {Ross Wightman},
  title        = {PyTorch Image Models},
  year         = {2019},
  publisher    = {GitHub},
  journal      = {GitHub repository},
  doi          = {10.5281/zenodo.4414861},
  howpublished = {\\url{https://github.com/huggingface/pytorch-image-models}}
}"""
